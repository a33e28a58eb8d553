"""What every peer does with a request: the same as the project's POST /encode."""

import io
import os

import numpy as np
import onnxruntime as ort
from PIL import Image

ENCODER = os.environ["PEER_ENCODER"]  # the bundle's encoder.onnx
SIZE = (int(os.environ["PEER_WIDTH"]), int(os.environ["PEER_HEIGHT"]))


def session() -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    return ort.InferenceSession(ENCODER, options, providers=["CPUExecutionProvider"])


def png_to_x(data: bytes) -> np.ndarray:
    """PNG bytes -> (1, H, W) float32 in [0, 1], grey, resized only when not the model's size."""
    image = Image.open(io.BytesIO(data)).convert("L")
    if image.size != SIZE:
        image = image.resize(SIZE)
    return (np.asarray(image, np.float32) / np.float32(255.0))[None]


def npy_to_x(data: bytes) -> np.ndarray:
    """np.save of (B, H, W) uint8 -> (B, 1, H, W) float32 in [0, 1]."""
    array = np.load(io.BytesIO(data), allow_pickle=False)
    return (array.astype(np.float32) / np.float32(255.0))[:, None]
