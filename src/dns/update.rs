//! RFC 2136 UPDATE messages for replacing RRsets atomically. Builds messages only; sending is
//! `server.rs`'s job.
//!
//! Each change carries the RRset the zone is expected to hold now. RFC 2136 §3.2 has the
//! server check every prerequisite before it applies any update, and §3.4 apply all updates
//! or none, so a zone that changed underneath is left exactly as it was.

use hickory_proto::op::{Edns, Message, OpCode, Query, UpdateMessage};
use hickory_proto::rr::{DNSClass, Name, Record, RecordType};

/// One RRset: what the zone must hold now, and what it should hold after.
#[derive(Debug, Clone)]
pub struct RrsetChange {
    pub name: Name,
    pub rtype: RecordType,
    pub current: Vec<Record>,
    pub desired: Vec<Record>,
}

impl RrsetChange {
    pub fn is_noop(&self) -> bool {
        let key = |rs: &[Record]| {
            let mut v: Vec<(u32, String)> =
                rs.iter().map(|r| (r.ttl, r.data.to_string())).collect();
            v.sort();
            v
        };
        key(&self.current) == key(&self.desired)
    }
}

pub fn update_message(zone: &Name, changes: &[RrsetChange]) -> Message {
    let mut zone_section = Query::new();
    zone_section
        .set_name(zone.clone())
        .set_query_class(DNSClass::IN)
        .set_query_type(RecordType::SOA);
    let mut message = Message::query();
    message.metadata.op_code = OpCode::Update;
    message.metadata.recursion_desired = false;
    message.add_zone(zone_section);
    for change in changes {
        if change.current.is_empty() {
            // §2.4.3 RRset does not exist: CLASS NONE, TTL 0, no RDATA.
            let mut absent = Record::update0(change.name.clone(), 0, change.rtype);
            absent.dns_class = DNSClass::NONE;
            message.add_pre_requisite(absent);
        } else {
            // §2.4.2 RRset exists (value dependent): the whole RRset, TTL 0, zone class.
            for record in &change.current {
                let mut exists = record.clone();
                exists.ttl = 0;
                message.add_pre_requisite(exists);
            }
        }
        // §2.5.4 delete an RR from an RRset: CLASS NONE, TTL 0.
        for record in &change.current {
            let mut delete = record.clone();
            delete.dns_class = DNSClass::NONE;
            delete.ttl = 0;
            message.add_update(delete);
        }
        // §2.5.1 add to an RRset.
        for record in &change.desired {
            message.add_update(record.clone());
        }
    }
    message
        .edns
        .get_or_insert_with(Edns::new)
        .set_max_payload(1232)
        .set_version(0);
    message
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::A;
    use hickory_proto::rr::RData;
    use std::str::FromStr;

    fn a(ip: &str, ttl: u32) -> Record {
        let name = Name::from_str("mail.example.org.").unwrap();
        Record::from_rdata(name, ttl, RData::A(A::from_str(ip).unwrap()))
    }

    #[test]
    fn a_swap_checks_the_whole_current_rrset_then_replaces_it() {
        let zone = Name::from_str("example.org.").unwrap();
        let change = RrsetChange {
            name: Name::from_str("mail.example.org.").unwrap(),
            rtype: RecordType::A,
            current: vec![a("198.51.100.10", 300)],
            desired: vec![a("198.51.100.20", 300)],
        };
        let m = update_message(&zone, &[change]);
        assert_eq!(m.metadata.op_code, OpCode::Update);
        let pre = m.prerequisites();
        assert_eq!(pre.len(), 1);
        assert_eq!((pre[0].ttl, pre[0].dns_class), (0, DNSClass::IN));
        let upd = m.updates();
        assert_eq!(upd.len(), 2);
        assert_eq!((upd[0].dns_class, upd[0].ttl), (DNSClass::NONE, 0));
        assert_eq!(upd[1].data.to_string(), "198.51.100.20");
    }

    #[test]
    fn adding_a_new_rrset_requires_that_it_does_not_exist() {
        let zone = Name::from_str("example.org.").unwrap();
        let change = RrsetChange {
            name: Name::from_str("mail.example.org.").unwrap(),
            rtype: RecordType::AAAA,
            current: vec![],
            desired: vec![],
        };
        let m = update_message(&zone, &[change]);
        assert_eq!(m.prerequisites()[0].dns_class, DNSClass::NONE);
        assert!(m.updates().is_empty());
    }
}
