"""Importing this module registers the standard seqio tasks (`tasks.register_standard_tasks`):
for seqio's own tools, which find tasks by importing a module, e.g.

    python -m seqio.scripts.cache_tasks_main --module_import=flash_jax.data.standard_tasks ...

Nothing else imports it: `flash_jax.data` registers a task on first use (`get_task`).
"""

from flash_jax.data import tasks

NAMES = tuple(tasks.register_standard_tasks())
