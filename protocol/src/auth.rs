//! Mutual authentication of peer connections with the cluster secret.
//!
//! The handshake is an HMAC-SHA256 challenge–response over fresh nonces from both sides,
//! bound to both node ids, so neither side learns anything it could replay:
//!
//! ```text
//! dialer  → Hello     { cluster, n, me, nonce_d }
//! listener→ Challenge { me, nonce_l, proof_l = MAC(k, "listener" | nonce_d | nonce_l | id_d | id_l) }
//! dialer  → Proof     { proof_d = MAC(k, "dialer" | nonce_d | nonce_l | id_d | id_l) }
//! listener→ HelloAck
//! ```
//!
//! `k = HMAC-SHA256(secret, "ringkv/peer/v1/" | cluster name)`. The dialer checks `proof_l`
//! before it proves anything (a listener without the secret learns nothing usable), and the
//! listener serves nothing before `proof_d` checks out. A recorded proof is useless on
//! another connection: the other side's nonce is fresh. The roles are part of the MAC, so a
//! proof cannot be reflected back. Every field is length-prefixed, so no two inputs collide.
//!
//! The handshake authenticates the peer; it does not encrypt or sign the frames that follow
//! (docs/operations.md says what that leaves to the network).

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Bytes of a handshake nonce (fresh random per connection and side).
pub const NONCE_LEN: usize = 32;
/// Bytes of a handshake proof (an HMAC-SHA256 tag).
pub const PROOF_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// Which side of the handshake a proof speaks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The node that opened the connection.
    Dialer,
    /// The node that accepted it.
    Listener,
}

impl Role {
    fn label(self) -> &'static [u8] {
        match self {
            Role::Dialer => b"dialer",
            Role::Listener => b"listener",
        }
    }
}

/// What both proofs of one handshake are computed over.
#[derive(Debug, Clone, Copy)]
pub struct Transcript<'a> {
    pub dialer_nonce: &'a [u8; NONCE_LEN],
    pub listener_nonce: &'a [u8; NONCE_LEN],
    pub dialer_id: &'a str,
    pub listener_id: &'a str,
}

/// The key peers prove knowledge of, derived from the cluster secret and name. Its `Debug`
/// never shows the key.
#[derive(Clone)]
pub struct PeerKey([u8; 32]);

impl std::fmt::Debug for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerKey(<secret>)")
    }
}

impl PeerKey {
    pub fn new(secret: &str, cluster: &str) -> PeerKey {
        let mut mac =
            HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC accepts keys of any size");
        mac.update(b"ringkv/peer/v1/");
        mac.update(cluster.as_bytes());
        PeerKey(mac.finalize().into_bytes().into())
    }

    fn mac(&self, role: Role, t: &Transcript) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.0).expect("HMAC accepts 32-byte keys");
        for field in [
            role.label(),
            &t.dialer_nonce[..],
            &t.listener_nonce[..],
            t.dialer_id.as_bytes(),
            t.listener_id.as_bytes(),
        ] {
            mac.update(&(field.len() as u32).to_be_bytes());
            mac.update(field);
        }
        mac
    }

    /// The proof `role` sends for this handshake.
    pub fn proof(&self, role: Role, t: &Transcript) -> [u8; PROOF_LEN] {
        self.mac(role, t).finalize().into_bytes().into()
    }

    /// Checks a proof in constant time.
    pub fn verify(&self, role: Role, t: &Transcript, proof: &[u8]) -> bool {
        self.mac(role, t).verify_slice(proof).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transcript<'a>(d: &'a [u8; 32], l: &'a [u8; 32]) -> Transcript<'a> {
        Transcript {
            dialer_nonce: d,
            listener_nonce: l,
            dialer_id: "n1",
            listener_id: "n2",
        }
    }

    #[test]
    fn proofs_check_only_with_the_same_secret_cluster_role_nonces_and_ids() {
        let (d, l) = ([1u8; 32], [2u8; 32]);
        let key = PeerKey::new("s3cret", "prod");
        let t = transcript(&d, &l);
        let p = key.proof(Role::Dialer, &t);
        assert!(key.verify(Role::Dialer, &t, &p));
        assert!(!key.verify(Role::Listener, &t, &p), "no reflection");
        assert!(!PeerKey::new("other", "prod").verify(Role::Dialer, &t, &p));
        assert!(!PeerKey::new("s3cret", "staging").verify(Role::Dialer, &t, &p));
        let fresh = [3u8; 32];
        assert!(
            !key.verify(Role::Dialer, &transcript(&d, &fresh), &p),
            "a proof is bound to the listener's fresh nonce (no replay)"
        );
        let swapped = Transcript {
            dialer_id: "n2",
            listener_id: "n1",
            ..t
        };
        assert!(!key.verify(Role::Dialer, &swapped, &p), "bound to both ids");
        assert!(!key.verify(Role::Dialer, &t, &p[..31]));
        assert_eq!(format!("{key:?}"), "PeerKey(<secret>)");
    }
}
