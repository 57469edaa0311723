"""Front ends that let a VMM reach the relay over a socket protocol.

Each front end is a protocol endpoint (vhost-user for the virtio-iommu
device itself, vfio-user for endpoints whose DMA the relay translates)
driven by one :class:`~hostrelay.frontends.loop.Loop` in the relay's
process.  They sit above :class:`~hostrelay.relay.Relay` and hold no device
semantics of their own: messages in, ``Relay`` calls, messages out.
"""
