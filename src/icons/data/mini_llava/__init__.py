"""The miniature LLaVA benchmark (the embedded default): pool, ten target tasks, stage-1 data."""
from .build import Benchmark, BenchmarkSpec, build, tokenizer_corpus
from .tasks import LONG_ANSWER_TASKS, METRIC, MME_SUBTASKS, TASK_NAMES

__all__ = ["Benchmark", "BenchmarkSpec", "build", "tokenizer_corpus", "TASK_NAMES", "METRIC",
           "MME_SUBTASKS", "LONG_ANSWER_TASKS"]
