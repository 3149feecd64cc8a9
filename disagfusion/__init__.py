"""disagfusion: disaggregated diffusion serving (encoder / denoiser / decoder stages)."""

__version__ = "0.1.0"
