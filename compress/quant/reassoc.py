"""Decoder re-association and the channels-last tail now live in `model.rewrites` (inference rewrites, not
quantisation); re-exported here."""
from model.rewrites import (CHANNELS_LAST_SLOTS, MIN_TAIL_CHANNELS, ChannelsLast3d, ReassociatedDecoder,
                            channels_last_tail, decoder_kind, final_layer, has_channels_last_tail,
                            reassociate_decoder, tail_channels)

__all__ = [
    "CHANNELS_LAST_SLOTS", "MIN_TAIL_CHANNELS", "ChannelsLast3d", "ReassociatedDecoder", "channels_last_tail",
    "decoder_kind", "final_layer", "has_channels_last_tail", "reassociate_decoder", "tail_channels",
]
