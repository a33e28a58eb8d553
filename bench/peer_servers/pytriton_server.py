"""Triton (PyTriton) peer: POST /v2/models/<name>/infer, KServe v2 with the binary-data extension.

python pytriton_server.py HTTP_PORT
Models: encoder (1 instance) and encoder_2i (2 instances): the PNG as a BYTES tensor, Triton's
dynamic batcher (max 64, no queue delay); encoder_u8: many images as one UINT8 (B, H, W) tensor.
"""

import logging
import os
import sys

import numpy as np
from pytriton.decorators import batch
from pytriton.model_config import DynamicBatcher, ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import png_to_x, session

OUTPUTS = [
    Tensor(name="mu", dtype=np.float32, shape=(-1,)),
    Tensor(name="logvar", dtype=np.float32, shape=(-1,)),
]


def png_model():
    encoder = session()

    @batch
    def infer(image):  # (B, 1) bytes
        mu, logvar = encoder.run(None, {"x": np.stack([png_to_x(bytes(b)) for b in image[:, 0]])})
        return {"mu": mu, "logvar": logvar}

    return infer


def u8_model():
    encoder = session()

    @batch
    def infer(x):  # (B, H, W) uint8: the batch as one tensor, Triton's own way
        mu, logvar = encoder.run(None, {"x": (x.astype(np.float32) / np.float32(255.0))[:, None]})
        return {"mu": mu, "logvar": logvar}

    return infer


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    port = int(sys.argv[1])
    width, height = int(os.environ["PEER_WIDTH"]), int(os.environ["PEER_HEIGHT"])
    config = TritonConfig(
        http_port=port,
        grpc_port=port + 1,
        metrics_port=port + 2,
        http_address="127.0.0.1",
        grpc_address="127.0.0.1",
        log_verbose=0,
    )
    batcher = DynamicBatcher(max_queue_delay_microseconds=0)
    with Triton(config=config) as triton:
        for name, instances in (("encoder", 1), ("encoder_2i", 2)):
            triton.bind(
                model_name=name,
                infer_func=[png_model() for _ in range(instances)],
                inputs=[Tensor(name="image", dtype=np.bytes_, shape=(1,))],
                outputs=OUTPUTS,
                config=ModelConfig(max_batch_size=64, batcher=batcher),
                strict=True,
            )
        triton.bind(
            model_name="encoder_u8",
            infer_func=[u8_model()],
            inputs=[Tensor(name="x", dtype=np.uint8, shape=(height, width))],
            outputs=OUTPUTS,
            config=ModelConfig(max_batch_size=64, batcher=batcher),
            strict=True,
        )
        triton.serve()
