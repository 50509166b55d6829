"""BatchNorm folding now lives in `model.rewrites` (an inference rewrite, not quantisation); re-exported here."""
from model.rewrites import DECODER_PAIRS, bn_pairs, fold_bn, fold_conv_bn

__all__ = ["DECODER_PAIRS", "bn_pairs", "fold_bn", "fold_conv_bn"]
