from .result import CompletionOutput, GenerationResult, IterationResult

__all__ = ["CompletionOutput", "GenerationResult", "IterationResult"]
