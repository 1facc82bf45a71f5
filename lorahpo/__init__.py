"""lorahpo: tune LoRA adapters of a Llama-family sequence classifier with Ray Tune + Optuna (TPE) + ASHA."""

__version__ = "0.1.0"
