"""Ferret model: config, modeling (registered with AutoConfig / AutoModelForCausalLM), loading tools."""

from ferret.model.configuration_ferret import FerretConfig, FerretConfigError
from ferret.model.modeling_ferret import FerretLlamaForCausalLM, FerretModel, RegionTokenMismatchError

__all__ = ["FerretConfig", "FerretConfigError", "FerretLlamaForCausalLM", "FerretModel", "RegionTokenMismatchError"]
