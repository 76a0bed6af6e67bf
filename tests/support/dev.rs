//! `dynseg dev` as a child process on the manual clock, for end-to-end tests
//! that drive it through the gateway.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use dynseg_proto::pb;
use dynseg_proto::pb::control_client::ControlClient;
use dynseg_proto::pb::gateway_client::GatewayClient;
use dynseg_rules::Timestamp;
use tonic::transport::Channel;

use super::clients::{Answer, http};
use super::{DevProcess, wait_for_rules};

/// The HTTP write key a [`Dev`] accepts.
pub const WRITE_KEY: &str = "wk_e2e";

/// Where a [`Dev`]'s manual clock starts.
pub const T0: &str = "2026-03-01T12:00:00Z";

/// `dynseg dev` on the manual clock at [`T0`], with one write key.
pub struct Dev {
    pub process: DevProcess,
    pub control: String,
    pub node: String,
    pub gateway: String,
    pub http: String,
}

impl Dev {
    pub fn start(extra: &str) -> Dev {
        Dev::start_with_env(extra, &[])
    }

    pub fn start_with_env(extra: &str, env: &[(&str, &str)]) -> Dev {
        let line = format!("--shards 8 --clock manual={T0} --write-key {WRITE_KEY} {extra}");
        let process = DevProcess::start(&line, env);
        Dev {
            control: process.control.clone(),
            node: process.node.clone(),
            gateway: process.gateway.clone(),
            http: process.http.clone(),
            process,
        }
    }

    /// Stops it cleanly and starts it again on the same data.
    pub fn restart(&mut self) {
        self.process.restart();
        self.refresh();
    }

    /// Kills it (SIGKILL) and starts it again on the same data.
    pub fn crash_and_restart(&mut self) {
        self.process.crash_and_restart();
        self.refresh();
    }

    fn refresh(&mut self) {
        self.control = self.process.control.clone();
        self.node = self.process.node.clone();
        self.gateway = self.process.gateway.clone();
        self.http = self.process.http.clone();
    }

    pub async fn client(&self) -> GatewayClient<Channel> {
        GatewayClient::connect(format!("http://{}", self.gateway))
            .await
            .unwrap()
    }

    /// Applies `segments` (id, rule) and waits until the node has them.
    pub async fn apply(&self, segments: &[(&str, &str)]) {
        let mut control = ControlClient::connect(format!("http://{}", self.gateway))
            .await
            .unwrap();
        control
            .apply_segments(pb::SegmentsRequest {
                segments: segments
                    .iter()
                    .map(|(id, rule)| pb::SegmentDef {
                        id: (*id).into(),
                        name: (*id).into(),
                        rule: (*rule).into(),
                        ..pb::SegmentDef::default()
                    })
                    .collect(),
            })
            .await
            .unwrap();
        let mut client = self.client().await;
        for (id, _) in segments {
            wait_for_rules(&mut client, id).await;
        }
    }

    /// The segments of each user, as the gateway answers.
    pub async fn memberships(&self, users: &[&str]) -> BTreeMap<String, BTreeSet<String>> {
        let mut client = self.client().await;
        let mut out = BTreeMap::new();
        for user in users {
            let reply = client
                .get_user(pb::GetUserRequest {
                    user_id: (*user).into(),
                })
                .await
                .unwrap()
                .into_inner();
            out.insert((*user).to_owned(), reply.segments.into_iter().collect());
        }
        out
    }

    pub async fn advance(&self, by: Duration) {
        self.client()
            .await
            .advance_clock(pb::AdvanceClockRequest {
                target: Some(pb::advance_clock_request::Target::ByMs(
                    by.as_millis() as i64
                )),
            })
            .await
            .unwrap();
    }

    pub fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Answer {
        http(&self.http, "POST", path, headers, body)
    }
}

/// Milliseconds since the epoch of an RFC 3339 time.
pub fn ms(text: &str) -> i64 {
    Timestamp::parse_rfc3339(text).unwrap().millis()
}
