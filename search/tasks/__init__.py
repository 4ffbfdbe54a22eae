"""The built-in tasks, as `--task search.tasks:NAME`: real pretrained models with the data their
packages ship (mobilenet_v2, the default; minilm_text), and small digits fixtures for tests."""

from search.tasks.digits import digits, digits_mobilenet, digits_resnet, digits_transformer
from search.tasks.pretrained import minilm_text, mobilenet_v2

__all__ = ["digits", "digits_mobilenet", "digits_resnet", "digits_transformer", "minilm_text",
           "mobilenet_v2"]
