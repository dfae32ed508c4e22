"""RQ side: job entry points (`tasks`), one worker process (`worker`), the launcher."""
