"""Example device models for the Bus, and adapters for existing ones.

- :class:`Uart16550`: a 16550A in polled mode: transmit holding register
  writes coalesced, status reads flush them first.
- :class:`Framebuffer`: a plain MMIO memory region (all writes coalesced).
- :class:`IndexDataPair`: an index register and a data register (index
  coalesced, data flush-on-access), byte-addressable;
  :class:`PciConfig`: PCI configuration mechanism #1 on such a pair.
- :class:`Doorbell`: a register whose written values matter, on a buffer of
  its own with a poller.
- adapters: :class:`FunctionDevice` (plain callables), :class:`UnicornMmio`
  (unicorn's ``mmio_map`` callbacks), :class:`Avatar2Peripheral` (avatar2's
  ``hw_read``/``hw_write``).
"""

from .adapters import Avatar2Peripheral, FunctionDevice, UnicornMmio
from .models import Doorbell, Framebuffer, IndexDataPair, PciConfig, Uart16550

__all__ = ["Avatar2Peripheral", "Doorbell", "Framebuffer", "FunctionDevice", "IndexDataPair",
           "PciConfig", "Uart16550", "UnicornMmio"]
