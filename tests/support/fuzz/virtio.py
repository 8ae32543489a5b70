"""stub"""
from pathlib import Path
from typing import Any

def make_virtio_case(directory: Path, name: str) -> Any:
    raise NotImplementedError

async def run_virtio_case(params: dict[str, int]) -> None:
    raise NotImplementedError
