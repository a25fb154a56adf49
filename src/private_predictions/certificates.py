"""A door's TLS key and self-signed certificate, made when its server starts.

The key never leaves the server's memory. Clients do not trust any certificate
authority for it: their card carries this very certificate, and the door must show it.
The certificate names the door by a fixed name (``door_name``), not by an address, so
the same card works whichever address of the teacher's laptop the class reaches.
"""
import datetime
import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from .client import door_name

VALID_DAYS = 30  # a server runs for a class or a course, not for years


def make_certificate(server: str):
    """(private key, certificate), both PEM bytes, for ``server``'s door."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, door_name(server))])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # a laptop whose clock is a little behind
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(door_name(server))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return key_pem, certificate.public_bytes(serialization.Encoding.PEM)


def fingerprint(certificate_pem: bytes) -> str:
    """SHA-256 of the certificate (DER), as people compare it aloud: groups of four hex digits."""
    der = x509.load_pem_x509_certificate(certificate_pem).public_bytes(serialization.Encoding.DER)
    digest = hashlib.sha256(der).hexdigest()
    return " ".join(digest[i:i + 4] for i in range(0, len(digest), 4))
