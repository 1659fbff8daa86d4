"""Wire messages carry their limits as ``Meta`` constraints: a frame breaking one never gets past decoding."""

from __future__ import annotations

import pytest

from unitedllm.errors import ProtocolError
from unitedllm.protocol.messages import BlobRef, Update
from unitedllm.protocol.signing import open_frame, seal

SECRET = b"wire-limits-secret"


def update(**ref: object) -> Update:
    fields = {"digest": "a" * 64, "size": 4, **ref}
    return Update(run_id="r", round=0, sender=1, num_samples=3, delta_ref=BlobRef(**fields))  # type: ignore[arg-type]


def test_a_well_formed_update_opens() -> None:
    assert open_frame(seal(update(), SECRET), SECRET) == update()


@pytest.mark.parametrize(
    ("ref", "where"),
    [
        ({"digest": "../../other-run/" + "a" * 49}, "delta_ref.digest"),  # the digest is the store key
        ({"digest": "A" * 64}, "delta_ref.digest"),
        ({"digest": "a" * 63}, "delta_ref.digest"),
        ({"size": -1}, "delta_ref.size"),
    ],
)
def test_a_bad_blob_reference_is_refused_naming_the_field(ref: dict[str, object], where: str) -> None:
    with pytest.raises(ProtocolError, match=rf"malformed message: .*\$\.{where}"):
        open_frame(seal(update(**ref), SECRET), SECRET)


def test_a_negative_sender_is_refused() -> None:
    message = Update(
        run_id="r", round=0, sender=-1, num_samples=3, delta_ref=BlobRef(digest="a" * 64, size=4)
    )
    with pytest.raises(ProtocolError, match=r"\$\.sender"):
        open_frame(seal(message, SECRET), SECRET)
