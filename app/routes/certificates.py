"""The public key that deletion certificates are signed with (open: it is public)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from worker.errors import NotFound

from ..guards import StrictJSONRoute
from ..schemas import CertificateKey

router = APIRouter(prefix="/certificates", tags=["certificates"], route_class=StrictJSONRoute)


@router.get("/public-key", response_model=CertificateKey,
            responses={404: {"description": "certificates are not signed here (no signing key configured)"}})
def read_public_key(request: Request) -> CertificateKey:
    """The Ed25519 public key (raw, base64) and its id, which a certificate's
    ``signature.key_id`` names; 404 when certificates are not signed
    (``UNLEARND_CERTIFICATE_KEY_FILE`` unset)."""
    signer = request.app.state.signer
    if signer is None:
        raise NotFound("certificates are not signed here: the service has no signing key "
                       "(UNLEARND_CERTIFICATE_KEY_FILE)")
    return CertificateKey(**signer.public_key_info())
