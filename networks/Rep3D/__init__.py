from networks.Rep3D.network_backbone import REP3D

__all__ = ["REP3D"]
