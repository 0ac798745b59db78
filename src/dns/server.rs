//! Talking to one DNS server: plain queries (the answer as that server gives it, with its
//! TTLs and AA bit, no cache in between) and signed updates. Every error names the server.

use anyhow::{anyhow, bail, Result};
use hickory_net::client::{Client, ClientHandle};
use hickory_net::runtime::TokioRuntimeProvider;
use hickory_net::udp::UdpClientStream;
use hickory_net::xfer::DnsHandle;
use hickory_proto::op::{DnsRequest, Message, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType, TSigner};
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

pub const QUERY_TIMEOUT: Duration = Duration::from_secs(3);

/// `ip`, `ip:port` or `[ipv6]:port`; port 53 when absent.
pub fn parse_server(s: &str) -> Result<SocketAddr> {
    if let Ok(addr) = s.parse::<SocketAddr>() {
        return Ok(addr);
    }
    if let Ok(ip) = s.trim_matches(['[', ']']).parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, 53));
    }
    bail!("{s:?} is not an address: use an IP address, optionally with :port")
}

/// The first `nameserver` of /etc/resolv.conf.
pub fn system_resolver() -> Result<SocketAddr> {
    let text = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .find_map(|ip| ip.trim().parse::<IpAddr>().ok())
        .map(|ip| SocketAddr::new(ip, 53))
        .ok_or_else(|| {
            anyhow!("no nameserver in /etc/resolv.conf; set [dns] resolver = \"IP\" in the config")
        })
}

/// What one server answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub rcode: ResponseCode,
    pub authoritative: bool,
    pub answers: Vec<Record>,
}

pub struct Server {
    pub addr: SocketAddr,
    client: Client<TokioRuntimeProvider>,
}

impl Server {
    pub fn new(addr: SocketAddr, signer: Option<TSigner>) -> Server {
        let stream = UdpClientStream::builder(addr, TokioRuntimeProvider::default())
            .with_timeout(Some(QUERY_TIMEOUT))
            .with_signer(signer)
            .build();
        let (client, background) = Client::<TokioRuntimeProvider>::from_sender(stream);
        tokio::spawn(background);
        Server { addr, client }
    }

    pub async fn query(&self, name: &Name, rtype: RecordType) -> Result<Answer> {
        let mut client = self.client.clone();
        let response = client
            .query(name.clone(), DNSClass::IN, rtype)
            .await
            .map_err(|e| self.describe(e, &format!("{rtype} {name}")))?;
        Ok(Answer {
            rcode: response.metadata.response_code,
            authoritative: response.metadata.authoritative,
            answers: response.answers.clone(),
        })
    }

    /// Sends an UPDATE; returns the response code (the caller decides what each means).
    pub async fn update(&self, message: Message) -> Result<ResponseCode> {
        let mut responses = self.client.send(DnsRequest::from(message));
        use futures_util::StreamExt as _;
        match responses.next().await {
            Some(Ok(response)) => Ok(response.metadata.response_code),
            Some(Err(e)) => Err(self.describe(e, "the update")),
            None => bail!(
                "{} closed the connection without answering the update",
                self.addr
            ),
        }
    }

    fn describe(&self, e: impl std::fmt::Display, what: &str) -> anyhow::Error {
        let text = e.to_string();
        if text.contains("timed out") || text.contains("timeout") {
            anyhow!(
                "no answer from {} to {what} within {}s (is the address right and the server up?)",
                self.addr,
                QUERY_TIMEOUT.as_secs()
            )
        } else {
            anyhow!("{} did not answer {what}: {text}", self.addr)
        }
    }
}
