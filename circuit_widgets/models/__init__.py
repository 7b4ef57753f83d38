"""Loading models: the offline demo weights, any Hugging Face model, and tiny random models.

Everything returns a TransformerLens 4 ``TransformerBridge``. ``loading`` holds ``load_model``;
``gguf`` the cached GGUF checkpoints; ``adapters`` the LoRA adapters; ``tiny`` the tiny models.
Every public name stays importable from ``circuit_widgets.models``.
"""

from circuit_widgets.models._common import (
    BUILTIN_SPECS,
    CACHE_ENV,
    ModelLoadError,
    cache_dir,
)
from circuit_widgets.models.adapters import (
    DEMO_ADAPTERS,
    DEMO_ARITH_ADAPTER,
    DEMO_BOXES_ADAPTER,
    check_adapters,
    lora_demo,
    peft_wrap,
)
from circuit_widgets.models.gguf import (
    DEMO_PACKAGE,
    DEMO_PIP,
    GEMMA_PACKAGE,
    GEMMA_PIP,
    cached_gguf_checkpoint,
    demo_gguf_path,
)
from circuit_widgets.models.loading import load_model, model_shape
from circuit_widgets.models.tiny import tiny_model, tiny_tokenizer
from circuit_widgets.types import ModelShape

__all__ = [
    "BUILTIN_SPECS",
    "CACHE_ENV",
    "DEMO_ADAPTERS",
    "DEMO_ARITH_ADAPTER",
    "DEMO_BOXES_ADAPTER",
    "DEMO_PACKAGE",
    "DEMO_PIP",
    "GEMMA_PACKAGE",
    "GEMMA_PIP",
    "ModelLoadError",
    "ModelShape",
    "cache_dir",
    "cached_gguf_checkpoint",
    "check_adapters",
    "demo_gguf_path",
    "load_model",
    "lora_demo",
    "model_shape",
    "peft_wrap",
    "tiny_model",
    "tiny_tokenizer",
]
