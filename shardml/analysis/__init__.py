"""Analysis tools: the HLO audit, the closed-form theory, and plans of a layout."""
