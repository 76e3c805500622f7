"""biomedap: few-shot adaptation of biomedical vision-language models."""

__version__ = "0.1.0"
