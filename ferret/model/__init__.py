"""Ferret model: config, modeling (registered with AutoConfig / AutoModelForCausalLM), loading tools."""

from ferret.model.configuration_ferret import FerretConfig, FerretConfigError
from ferret.model.modeling_ferret import FerretLlamaForCausalLM, FerretModel
from ferret.model.multimodal_inputs import RegionTokenMismatchError

__all__ = ["FerretConfig", "FerretConfigError", "FerretLlamaForCausalLM", "FerretModel", "RegionTokenMismatchError"]
