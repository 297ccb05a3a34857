"""Example device models for the Bus, and adapters for existing ones.

- :class:`Uart16550`: transmit holding register writes coalesced, status
  reads flush them first.
- :class:`Framebuffer`: a plain MMIO memory region (all writes coalesced).
- :class:`IndexDataPair`: PCI-config-style 0xcf8/0xcfc (index coalesced,
  data flush-on-access).
- :class:`Doorbell`: a register whose written values matter, on a buffer of
  its own with a poller.
- adapters: :class:`FunctionDevice` (plain callables), :class:`UnicornMmio`
  (unicorn's ``mmio_map`` callbacks), :class:`Avatar2Peripheral` (avatar2's
  ``hw_read``/``hw_write``).
"""

from .adapters import Avatar2Peripheral, FunctionDevice, UnicornMmio
from .models import Doorbell, Framebuffer, IndexDataPair, Uart16550

__all__ = ["Avatar2Peripheral", "Doorbell", "Framebuffer", "FunctionDevice", "IndexDataPair",
           "Uart16550", "UnicornMmio"]
