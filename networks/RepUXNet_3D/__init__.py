from networks.RepUXNet_3D.network_backbone import REPUXNET

__all__ = ["REPUXNET"]
