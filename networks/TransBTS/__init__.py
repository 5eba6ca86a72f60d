from networks.TransBTS.transbts import TransBTS

__all__ = ["TransBTS"]
