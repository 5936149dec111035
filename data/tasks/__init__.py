"""Long-context tasks: seeded generators (S-NIAH, MQAR, BABILong-style) and the training mixture.

    task = build_task("mqar:pairs=16", encode, vocab_size, haystack)
    sample = task.sample(np.random.default_rng(seed), length=512, depth=0.5)
    haystack = corpus_tokens(data_path, "val")          # the prepared corpus as one token stream
    loader = TaskMixture(train_loader, cfg.tasks, ...)  # rows replaced by task samples, with loss masks
"""

from titanforge.data.tasks.config import TaskMixConfig
from titanforge.data.tasks.generators import (TASKS, Sample, Task, TaskError, build_task, depth_bin, depth_grid,
                                              parse_spec)
from titanforge.data.tasks.mixture import TaskMixture, corpus_tokens, task_tokenizer

__all__ = ["TASKS", "Sample", "Task", "TaskError", "TaskMixConfig", "TaskMixture", "build_task", "corpus_tokens",
           "depth_bin", "depth_grid", "parse_spec", "task_tokenizer"]
