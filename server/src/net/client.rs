//! The client protocol handler: decode a request, let the node answer it.

use std::sync::Arc;

use ringkv_protocol::{ErrorKind, Frame, Request, Response};

use super::{FrameHandler, Reply};
use crate::metrics::inc;
use crate::node::Node;

pub struct ClientHandler {
    pub node: Arc<Node>,
}

impl FrameHandler for ClientHandler {
    async fn handle(self: Arc<Self>, frame: Frame) -> Reply {
        let id = frame.request_id;
        let resp = match Request::decode(frame.opcode, frame.body) {
            Ok(req) => self.node.handle(req).await,
            Err(e) => {
                inc(&self.node.client_net.malformed);
                Response::error(
                    ErrorKind::Malformed,
                    true,
                    format!("node {}: malformed request: {e}", self.node.config.node_id),
                )
            }
        };
        Reply {
            frame: resp.to_frame(id),
            close: false,
        }
    }
}
