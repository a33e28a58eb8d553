"""TorchServe handler: many images per request, as one np.save body of (B, H, W) uint8."""

import os
import sys

from ts.torch_handler.base_handler import BaseHandler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import npy_to_x, session


class NpyEncoderHandler(BaseHandler):
    def initialize(self, context):
        self.session = session()
        self.initialized = True

    def preprocess(self, data):
        return [npy_to_x(row.get("data") or row.get("body")) for row in data]

    def inference(self, xs, *args, **kwargs):
        return [self.session.run(None, {"x": x}) for x in xs]

    def postprocess(self, outs):
        return [{"mu": mu.tolist(), "logvar": logvar.tolist()} for mu, logvar in outs]
