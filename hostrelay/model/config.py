"""The device's config space and features (virtio 1.2 §5.13.3-4).

:class:`ConfigSpace` holds the ``struct virtio_iommu_config`` fields, the
features the device offers and the driver accepted, and the one writable
field, ``bypass``.  The fields derived from the host (``page_size_mask``,
``input_range``) are computed by :class:`~hostrelay.model.reality.HostReality`
and set (:meth:`ConfigSpace.set_host`) before the driver looks; once it has (first request, feature negotiation or
queue set-up) the config is *frozen* and stays as the driver read it.
"""

from __future__ import annotations

import logging

from hostrelay.model.wire import CONFIG_BYPASS_OFFSET, MAP_F_MASK, TAIL_SIZE, U32_MAX, U64_MAX, Config, Feature, MapFlag

log = logging.getLogger("hostrelay.relay")

# 4 KiB granule with every larger power of two as a hint (5.13.6: "the least
# significant bit set defines the page granularity"; the others are hints).
DEFAULT_PAGE_SIZE_MASK = U64_MAX & ~0xFFF
# Room for 21 RESV_MEM properties; QEMU uses the same size.
DEFAULT_PROBE_SIZE = 512
# The longest writable part the device answers.  A refused request's reply
# fills the writable part (zeros, then the tail: the Linux driver reads the
# status only when the used length equals the writable length), so this bounds
# what one request can make the host build and write.  64 KiB is 128 times
# QEMU's probe_size; a longer writable part cannot be a virtio-iommu reply
# and the chain is unparseable (used length 0, nothing written).
MAX_WRITABLE = 64 << 10


class ConfigSpace:
    """Config fields, features and the ``bypass`` write (see :class:`hostrelay.relay.Relay` for the options)."""

    def __init__(
        self,
        *,
        page_size_mask: int = DEFAULT_PAGE_SIZE_MASK,
        input_range: tuple[int, int] = (0, U64_MAX),
        domain_range: tuple[int, int] = (0, U32_MAX),
        bypass: bool = True,
        probe: bool = True,
        probe_size: int = DEFAULT_PROBE_SIZE,
        mmio: bool = True,
    ) -> None:
        if not 0 < page_size_mask <= U64_MAX:
            raise ValueError("page_size_mask must have at least one bit set (D-03)")
        if not 0 <= input_range[0] <= input_range[1] <= U64_MAX:
            raise ValueError("bad input_range")
        if not 0 <= domain_range[0] <= domain_range[1] <= U32_MAX:
            raise ValueError("bad domain_range")
        if probe and not 0 <= probe_size <= MAX_WRITABLE - TAIL_SIZE:
            raise ValueError(f"probe_size must be 0 to {MAX_WRITABLE - TAIL_SIZE}")
        self.page_size_mask = page_size_mask
        self.granule = page_size_mask & -page_size_mask
        self.input_start, self.input_end = input_range
        self.domain_start, self.domain_end = domain_range
        self.probe = probe
        self.probe_size = probe_size if probe else 0
        self.mmio = mmio
        self.map_flags_mask = MAP_F_MASK if mmio else MAP_F_MASK & ~MapFlag.MMIO
        self.initial_bypass = bool(bypass)
        self.bypass = self.initial_bypass
        self.driver_features: int | None = None
        self.frozen = False  # the driver has seen the config: host fields stay

    @property
    def device_features(self) -> int:
        """Feature bits the device offers (5.13.3 plus VIRTIO_F_VERSION_1)."""
        f = (
            Feature.VERSION_1
            | Feature.MAP_UNMAP
            | Feature.INPUT_RANGE
            | Feature.DOMAIN_RANGE
            | Feature.BYPASS_CONFIG  # never legacy F_BYPASS as well (D-02)
        )
        if self.probe:
            f |= Feature.PROBE
        if self.mmio:
            f |= Feature.MMIO
        return int(f)

    def ack_features(self, driver_features: int) -> int:
        """Record the features the driver accepted; returns the negotiated set."""
        self.driver_features = driver_features & self.device_features
        self.frozen = True  # the driver has read the config by now
        return self.driver_features

    def set_host(self, page_size_mask: int, input_range: tuple[int, int]) -> None:
        """The host-derived fields (before the freeze)."""
        self.page_size_mask = page_size_mask
        self.granule = page_size_mask & -page_size_mask
        self.input_start, self.input_end = input_range

    def config(self) -> Config:
        """The config space as a dataclass."""
        return Config(
            page_size_mask=self.page_size_mask,
            input_start=self.input_start,
            input_end=self.input_end,
            domain_start=self.domain_start,
            domain_end=self.domain_end,
            probe_size=self.probe_size,
            bypass=int(self.bypass),  # only ever 0 or 1 (D-05)
        )

    def bypass_write(self, offset: int, data: bytes) -> bool | None:
        """The ``bypass`` value a driver write to config space asks for, or ``None``.

        Only ``bypass`` (offset 36) is writable, only with 0 or 1 (5.13.4,
        G-01), only when BYPASS_CONFIG was negotiated; anything else is a
        driver error the device ignores so that it never presents another
        value (D-05).  Bytes of a wider write that fall on read-only fields
        are ignored too.
        """
        if not offset <= CONFIG_BYPASS_OFFSET < offset + len(data):
            log.debug("ignored config write at %d (%d bytes)", offset, len(data))
            return None
        if self.driver_features is not None and not (self.driver_features & Feature.BYPASS_CONFIG):
            log.debug("ignored bypass write: BYPASS_CONFIG not negotiated")
            return None
        value = data[CONFIG_BYPASS_OFFSET - offset]
        if value not in (0, 1):
            log.debug("ignored bypass write of %d", value)
            return None
        return bool(value)
