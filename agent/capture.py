"""From a classified frame to a spooled capture: policy decision, encoding, sidecar.

The image is encoded at most once: a JPEG from a file source is stored byte for byte
(re-encoding would degrade exactly the evidence a labeller needs); any other file is
decoded at full size and encoded once; a camera frame is encoded once as it was analysed.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from typing import Literal

import cv2
import numpy as np

from agent.config import UploadConfig
from agent.contract import DetectionMessage
from agent.contract.captures import (
    IMAGE_SUFFIX,
    MASK_SUFFIX,
    CapturedImage,
    CaptureSidecar,
    capture_stem,
)
from agent.engine.detector import Analysis
from agent.policy import Policy
from agent.sources import Frame
from agent.spool import CaptureFiles, Spool

log = logging.getLogger(__name__)

JPEG_MAGIC = b"\xff\xd8\xff"


class Capturer:
    """Owned by the frame loop; `on_stored` wakes the uploader."""

    def __init__(
        self,
        config: UploadConfig,
        *,
        device_id: str,
        policy: Policy,
        spool: Spool,
        on_stored: Callable[[], None],
    ) -> None:
        self.config = config
        self.device_id = device_id
        self.policy = policy
        self.spool = spool
        self.on_stored = on_stored

    def consider(
        self, frame: Frame, analysis: Analysis, message: DetectionMessage
    ) -> DetectionMessage:
        """Spool the frame, held, if the policy wants it; the message then names its future
        key. The caller releases it once the message is committed, or withdraws it."""
        decision = self.policy.decide(analysis, frame.image)
        if decision is None:
            return message
        stem = capture_stem(
            self.config.prefix, self.device_id, message.captured_at, message.message_id
        )
        image, content_type, original = self._image(frame)
        mask = None
        if self.config.upload_mask:
            ok, png = cv2.imencode(".png", analysis.mask)
            mask = png.tobytes() if ok else None
        message = message.model_copy(update={"upload_key": stem + IMAGE_SUFFIX})
        sidecar = CaptureSidecar(
            frame_id=message.message_id,
            category=decision.category,
            reasons=decision.reasons,
            note=decision.note,
            detection=message,
            model=message.model,
            image=CapturedImage(
                key=stem + IMAGE_SUFFIX,
                sha256=hashlib.sha256(image).hexdigest(),
                size=len(image),
                content_type=content_type,
                original=original,
            ),
            mask_key=stem + MASK_SUFFIX if mask is not None else None,
            captured_at=message.captured_at,
        )
        files = CaptureFiles(image, sidecar.model_dump_json(indent=1).encode(), mask)
        spooled = self.spool.add(
            message.message_id, decision.category, message.captured_at, files, held=True
        )
        if not spooled:
            return message.model_copy(update={"upload_key": None})
        return message

    def release(self, message: DetectionMessage) -> None:
        """`message` is committed: its capture (held until now, so the uploader cannot send
        one whose detection never goes out) may go up."""
        if message.upload_key is not None:
            self.spool.release(message.message_id)
            self.on_stored()

    def withdraw(self, message: DetectionMessage) -> None:
        """Take back the capture `consider` held for `message`, if it did."""
        if message.upload_key is not None:
            self.spool.withdraw(message.message_id)

    def _image(self, frame: Frame) -> tuple[bytes, Literal["image/jpeg"], bool]:
        data = frame.data
        if data is not None and data.startswith(JPEG_MAGIC):
            return data, "image/jpeg", True
        image = frame.image
        if data is not None:
            full = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
            if full is not None:
                image = np.asarray(full, dtype=np.uint8)
        ok, jpeg = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, self.config.jpeg_quality])
        if not ok:
            raise ValueError(f"{frame.name}: cannot encode as JPEG")
        return jpeg.tobytes(), "image/jpeg", False
