"""INT8: LSQ quantisation-aware fine-tuning and real INT8 CPU models (PyTorch quantized kernels, ONNX Runtime).

    from compress.quant import quantize_, LSQConfig, calibrate, convert, prepare_float, decide

The exact float rewrites it applies first (`prepare_float`) live in `model.rewrites`, re-exported here.
Importing the package registers the artifact kinds it rebuilds: int8-torch, int8-qat, onnx.
"""
from compress.quant.convert import Int8Conv3d, Int8Linear, convert, prepare_float
from compress.quant.decide import decide, format_table, int8_layers
from compress.quant.lsq import LSQConfig, QuantConv3d, QuantLinear, calibrate, quantize_
from compress.quant.onnx_export import OrtModel, export_onnx
from compress.quant.qat import QATRefineFormer3D, as_qat_model
from model.rewrites import ChannelsLast3d, ReassociatedDecoder, channels_last_tail, fold_bn, reassociate_decoder

__all__ = [
    "ChannelsLast3d", "Int8Conv3d", "Int8Linear", "LSQConfig", "OrtModel", "QATRefineFormer3D", "QuantConv3d", "QuantLinear",
    "ReassociatedDecoder", "calibrate", "channels_last_tail", "convert", "decide", "export_onnx", "fold_bn",
    "as_qat_model", "format_table", "int8_layers", "prepare_float", "quantize_", "reassociate_decoder",
]
