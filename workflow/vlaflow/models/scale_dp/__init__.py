from vlaflow.models.scale_dp.configuration_scale_dp import SCALE_DP_SIZES, ScaleDPConfig
from vlaflow.models.scale_dp.modeling_scale_dp import ScaleDPPolicy

__all__ = ["SCALE_DP_SIZES", "ScaleDPConfig", "ScaleDPPolicy"]
