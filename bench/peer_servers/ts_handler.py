"""TorchServe handler: one PNG per request (raw body), batched by TorchServe's batch_size."""

import os
import sys

import numpy as np
from ts.torch_handler.base_handler import BaseHandler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import png_to_x, session


class EncoderHandler(BaseHandler):
    def initialize(self, context):
        self.session = session()
        self.initialized = True

    def preprocess(self, data):
        return np.stack([png_to_x(row.get("data") or row.get("body")) for row in data])

    def inference(self, x, *args, **kwargs):
        return self.session.run(None, {"x": x})

    def postprocess(self, out):
        mu, logvar = out
        return [{"mu": m.tolist(), "logvar": v.tolist()} for m, v in zip(mu, logvar, strict=True)]
