//! A raw peer-protocol client for tests: it performs the authenticated handshake with any
//! cluster name and secret (right or wrong), or skips it, and then sends raw peer requests.
//! It is how the tests play a stranger on a node's peer port.

use std::time::Duration;

use ringkv_client::conn::Conn;
use ringkv_protocol::auth::{PeerKey, Role, Transcript};
use ringkv_protocol::peer::{
    Hello, MemberInfo, PeerRequest, PeerResponse, SessionRequest, SessionResponse,
};

/// What a peer client presents.
#[derive(Debug, Clone)]
pub struct PeerCredentials {
    pub cluster: String,
    pub n: u8,
    pub node_id: String,
    pub secret: String,
}

/// How a handshake ended.
pub enum Handshake {
    /// The listener accepted our proof: requests are served.
    Accepted(RawPeer),
    /// The listener's proof did not check out with our secret (it would not be used).
    ListenerUnproven(PeerResponse),
    /// The listener refused us (the reply to `Hello` or to our proof).
    Refused(PeerResponse),
}

pub struct RawPeer {
    pub conn: Conn,
    next_id: u64,
}

impl RawPeer {
    /// Opens a TCP connection to a peer port, without any handshake.
    pub async fn connect(addr: &str) -> Result<RawPeer, String> {
        let conn = Conn::connect(addr, Duration::from_secs(2), 64).await?;
        Ok(RawPeer { conn, next_id: 1 })
    }

    /// Sends one request and decodes the reply.
    pub async fn call(&mut self, req: &PeerRequest) -> Result<PeerResponse, String> {
        let id = self.next_id;
        self.next_id += 1;
        let frame = tokio::time::timeout(Duration::from_secs(10), self.conn.call(req.to_frame(id)))
            .await
            .map_err(|_| "no reply within 10 s".to_string())?
            .map_err(|e| format!("{e:?}"))?;
        PeerResponse::decode(frame.opcode, frame.body).map_err(|e| e.to_string())
    }

    /// Runs the handshake with `creds`. With `prove_anyway`, sends our proof even when the
    /// listener's did not check out (what a stranger would try).
    pub async fn handshake(
        mut self,
        creds: &PeerCredentials,
        prove_anyway: bool,
    ) -> Result<Handshake, String> {
        let nonce: [u8; 32] = rand::random();
        let hello = PeerRequest::Session(SessionRequest::Hello(Hello {
            cluster: creds.cluster.clone(),
            n: creds.n,
            me: MemberInfo {
                node_id: creds.node_id.clone(),
                client_addr: "127.0.0.1:1".into(),
                peer_addr: "127.0.0.1:2".into(),
                vnodes: 1,
                generation: 1,
            },
            nonce,
        }));
        let challenge = match self.call(&hello).await? {
            PeerResponse::Session(SessionResponse::Challenge(c)) => c,
            other => return Ok(Handshake::Refused(other)),
        };
        let key = PeerKey::new(&creds.secret, &creds.cluster);
        let transcript = Transcript {
            dialer_nonce: &nonce,
            listener_nonce: &challenge.nonce,
            dialer_id: &creds.node_id,
            listener_id: &challenge.me.node_id,
        };
        let listener_ok = key.verify(Role::Listener, &transcript, &challenge.proof);
        if !listener_ok && !prove_anyway {
            return Ok(Handshake::ListenerUnproven(PeerResponse::Session(
                SessionResponse::Challenge(challenge),
            )));
        }
        let proof = PeerRequest::Session(SessionRequest::HelloProof(
            key.proof(Role::Dialer, &transcript),
        ));
        match self.call(&proof).await? {
            PeerResponse::Session(SessionResponse::HelloAck) if listener_ok => {
                Ok(Handshake::Accepted(self))
            }
            PeerResponse::Session(SessionResponse::HelloAck) => {
                Err("listener unproven but accepted our proof".into())
            }
            other => Ok(Handshake::Refused(other)),
        }
    }
}
