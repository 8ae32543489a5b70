"""Every driver module; importing this package registers the format and protocol drivers."""

from vdiskfs.drivers.format import (
    qcow2,  # noqa: F401
    qed,  # noqa: F401
    raw,  # noqa: F401
    vdi,  # noqa: F401
    vhdx,  # noqa: F401
    vmdk,  # noqa: F401
    vpc,  # noqa: F401
)
from vdiskfs.drivers.protocol import (
    http,  # noqa: F401
    nbd,  # noqa: F401
    rbd,  # noqa: F401
    s3,  # noqa: F401
)
