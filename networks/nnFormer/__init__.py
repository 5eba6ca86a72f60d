from networks.nnFormer.nnformer import nnFormer

__all__ = ["nnFormer"]
