"""Where a run starts: the names older code imports; see :mod:`shardml.run.run_dir`.

    claim_out_dir(out_dir, ident, resume="auto")
    start = resume_point(out_dir, "auto", trainer, ident)
"""

from shardml.run.run_dir import (RUN_FILES, Identity, Start, checkpoint_meta, claim_out_dir, identity, move_aside,
                                 resume_point, write_run)

__all__ = ["RUN_FILES", "Identity", "Start", "checkpoint_meta", "claim_out_dir", "identity", "move_aside",
           "resume_point", "write_run"]
