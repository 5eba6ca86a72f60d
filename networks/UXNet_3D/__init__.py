from networks.UXNet_3D.network_backbone import UXNET

__all__ = ["UXNET"]
