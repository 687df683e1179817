//! Set elements: the desired elements of every set and map, from the spec and the facts.

use super::*;

/// One field value as an inclusive range of its bytes (network order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Range(Vec<u8>, Vec<u8>);

impl Range {
    fn one(v: Vec<u8>) -> Self {
        Range(v.clone(), v)
    }

    fn net(n: &IpNet) -> Self {
        match n {
            IpNet::V4(n) => Range(
                n.network().octets().to_vec(),
                n.broadcast().octets().to_vec(),
            ),
            IpNet::V6(n) => Range(
                n.network().octets().to_vec(),
                n.broadcast().octets().to_vec(),
            ),
        }
    }

    fn full(len: usize) -> Self {
        Range(vec![0; len], vec![0xff; len])
    }

    fn contains(&self, other: &Range) -> bool {
        self.0 <= other.0 && other.1 <= self.1
    }
}

pub(super) fn pad(out: &mut Bytes, v: &[u8]) {
    out.extend_from_slice(v);
    out.resize((out.len() + 3) & !3, 0);
}

/// Key bytes of a plain (non-interval) element.
pub(super) fn key(values: &[&[u8]]) -> Bytes {
    let mut k = Bytes::new();
    for v in values {
        pad(&mut k, v);
    }
    k
}

/// Element key of an interval element: start concatenation then end concatenation.
pub(super) fn interval_key(ranges: &[Range]) -> Bytes {
    let mut k = Bytes::new();
    for r in ranges {
        pad(&mut k, &r.0);
    }
    for r in ranges {
        pad(&mut k, &r.1);
    }
    k
}

/// Interval element keys for `boxes`, leaving out any box contained in another (the
/// kernel refuses overlapping insertions; a contained box adds nothing to the match).
pub(super) fn merge_boxes(boxes: Vec<Vec<Range>>) -> impl Iterator<Item = Bytes> {
    let mut kept: Vec<Vec<Range>> = Vec::new();
    for b in boxes {
        if kept
            .iter()
            .any(|k| k.iter().zip(&b).all(|(k, b)| k.contains(b)))
        {
            continue;
        }
        kept.retain(|k| !b.iter().zip(k).all(|(b, k)| b.contains(k)));
        kept.push(b);
    }
    kept.into_iter().map(|b| interval_key(&b))
}

pub(super) fn proto_byte(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => 6,
        Protocol::Udp => 17,
    }
}

pub(super) fn ip_bytes(a: IpAddr) -> Bytes {
    match a {
        IpAddr::V4(a) => Bytes::from_slice(&a.octets()),
        IpAddr::V6(a) => Bytes::from_slice(&a.octets()),
    }
}

/// The filter rules as `src . dst . proto . port` boxes, per family.
pub(super) fn filter_boxes(rules: &[FilterRule]) -> [Vec<Vec<Range>>; 2] {
    let mut out: [Vec<Vec<Range>>; 2] = [Vec::new(), Vec::new()];
    for r in rules {
        let nets = |list: &[String]| -> Vec<IpNet> {
            list.iter().filter_map(|s| s.parse().ok()).collect()
        };
        let (from, to) = (nets(&r.from), nets(&r.to));
        let proto = match r.protocol {
            Some(p) => Range::one(vec![proto_byte(p)]),
            None => Range::full(1),
        };
        let ports: Vec<Range> = if r.ports.is_empty() {
            vec![Range::full(2)]
        } else {
            r.ports
                .iter()
                .map(|p| Range::one(p.to_be_bytes().to_vec()))
                .collect()
        };
        for (fam, v6) in [(0, false), (1, true)] {
            let len = if v6 { 16 } else { 4 };
            let side = |nets: &[IpNet]| -> Option<Vec<Range>> {
                if nets.is_empty() {
                    return Some(vec![Range::full(len)]);
                }
                let r: Vec<Range> = nets
                    .iter()
                    .filter(|n| matches!(n, IpNet::V6(_)) == v6)
                    .map(Range::net)
                    .collect();
                (!r.is_empty()).then_some(r)
            };
            // A rule that names networks of one family only does not apply to the other.
            let (Some(src), Some(dst)) = (side(&from), side(&to)) else {
                continue;
            };
            for s in &src {
                for d in &dst {
                    for p in &ports {
                        out[fam].push(vec![s.clone(), d.clone(), proto.clone(), p.clone()]);
                    }
                }
            }
        }
    }
    out
}

/// One element: its set, key, and data (empty for plain sets).
pub type Element = (&'static SetDef, Bytes, Bytes);

/// The map entries one published port occupies, per address family: its map and key
/// (`false`: IPv4), whatever its target.
fn port_keys(p: &PublishedPort) -> SmallVec<[(bool, &'static SetDef, Bytes); 2]> {
    let proto = [proto_byte(p.protocol)];
    let port = p.host_port.to_be_bytes();
    let host_ip: Option<IpAddr> = p.host_ip.as_deref().and_then(|s| s.parse().ok());
    let mut out = SmallVec::new();
    for v6 in [false, true] {
        if host_ip.is_some_and(|h| h.is_ipv6() != v6) {
            continue;
        }
        out.push(match host_ip {
            Some(h) => (
                v6,
                if v6 { &DNAT6_ON } else { &DNAT4_ON },
                key(&[&ip_bytes(h), &proto, &port]),
            ),
            None => (
                v6,
                if v6 { &DNAT6_ANY } else { &DNAT4_ANY },
                key(&[&proto, &port]),
            ),
        });
    }
    out
}

/// The elements `in_force` holds for a port whose container the facts do not know yet
/// (the containers reconciler has not reported since the agent started): kept as they
/// are, so that an agent restart does not take a published port away for a moment.
fn kept_elements(
    p: &PublishedPort,
    facts: &Facts,
    in_force: Option<&Snapshot>,
) -> Option<SmallVec<[Element; 2]>> {
    let container = p.target.container.as_deref()?;
    if p.target.address.is_some() || facts.containers.contains_key(container) {
        return None;
    }
    let in_force = in_force?;
    let out: SmallVec<[Element; 2]> = port_keys(p)
        .into_iter()
        .filter_map(|(_, set, k)| {
            let data = in_force.elements.get(set.name)?.get(&k)?.clone();
            Some((set, k, data))
        })
        .collect();
    (!out.is_empty()).then_some(out)
}

/// The map elements of one published port, or `None` while its container has no
/// address (the port is skipped until it has one).
pub fn port_elements(p: &PublishedPort, facts: &Facts) -> Option<SmallVec<[Element; 2]>> {
    let fixed: Option<IpAddr> = p.target.address.as_deref().and_then(|a| a.parse().ok());
    let targets: &[IpAddr] = match (&fixed, &p.target.container) {
        (Some(a), _) => std::slice::from_ref(a),
        (None, Some(c)) => facts
            .containers
            .get(c)
            .map(|f| f.addresses.as_slice())
            .unwrap_or_default(),
        (None, None) => &[],
    };
    let out: SmallVec<[Element; 2]> = port_keys(p)
        .into_iter()
        .filter_map(|(v6, set, k)| {
            let t = targets.iter().find(|t| t.is_ipv6() == v6)?;
            Some((set, k, key(&[&ip_bytes(*t), &p.target.port.to_be_bytes()])))
        })
        .collect();
    (!out.is_empty()).then_some(out)
}

/// Why a published port is skipped, for the log and `converge diff`.
pub fn unresolved_note(p: &PublishedPort) -> String {
    let target = p.target.container.as_deref().unwrap_or("?");
    format!(
        "{}/{} -> container {target}",
        p.protocol.as_str(),
        p.host_port
    )
}

/// The protocol and port an `allowFrom` applies to: its elements depend on every
/// published port of the group.
pub type Group = (u8, u16);

pub fn group_of(p: &PublishedPort) -> Group {
    (proto_byte(p.protocol), p.host_port)
}

/// The `restricted` and `allow` elements of one group, from its published ports that
/// are in the maps and carry `allowFrom` (validation makes their lists agree per
/// family). A family is restricted where one of them is published on it.
pub fn allow_elements<'a>(
    group: Group,
    ports: impl Iterator<Item = &'a PublishedPort>,
) -> Vec<Element> {
    let (proto, port) = (vec![group.0], group.1.to_be_bytes());
    let mut restricted = [false; 2];
    let mut boxes: [Vec<Vec<Range>>; 2] = Default::default();
    for p in ports {
        let Some(from) = &p.allow_from else { continue };
        let host_ip: Option<IpAddr> = p.host_ip.as_deref().and_then(|s| s.parse().ok());
        for (fam, r) in restricted.iter_mut().enumerate() {
            *r |= host_ip.is_none_or(|h| usize::from(h.is_ipv6()) == fam);
        }
        for n in from.iter().filter_map(|s| s.parse::<IpNet>().ok()) {
            boxes[usize::from(matches!(n, IpNet::V6(_)))].push(vec![
                Range::net(&n),
                Range::one(proto.clone()),
                Range::one(port.to_vec()),
            ]);
        }
    }
    let mut out = Vec::new();
    let [b4, b6] = boxes;
    for (fam, (rset, aset, boxes)) in [(&RESTRICTED4, &ALLOW4, b4), (&RESTRICTED6, &ALLOW6, b6)]
        .into_iter()
        .enumerate()
    {
        if restricted[fam] {
            out.push((rset, key(&[&proto, &port]), Bytes::new()));
        }
        out.extend(merge_boxes(boxes).map(|k| (aset, k, Bytes::new())));
    }
    out
}

/// The desired table for `spec`, with container targets resolved through `facts`.
pub fn desired(spec: &FirewallSpec, facts: &Facts) -> Desired {
    desired_keeping(spec, facts, None)
}

/// [`desired`], keeping what `in_force` has for ports whose container the facts do not
/// know yet (see `kept_elements`): not yet known is not absent.
pub fn desired_keeping(spec: &FirewallSpec, facts: &Facts, in_force: Option<&Snapshot>) -> Desired {
    let (chains, sets, rules) = structure(spec);
    // Collected unsorted, then bulk-built: BTreeMap::from_iter sorts once (the
    // document's order is usually already sorted) instead of 10,000 tree inserts.
    let mut lists: BTreeMap<&'static str, Vec<(Bytes, Bytes)>> =
        sets.iter().map(|s| (s.name, Vec::new())).collect();
    let mut push = |(set, k, d): Element| {
        if let Some(e) = lists.get_mut(set.name) {
            e.push((k, d));
        }
    };
    let mut unresolved = Vec::new();
    let mut groups: BTreeMap<Group, Vec<&PublishedPort>> = BTreeMap::new();
    for p in &spec.published_ports {
        let resolved = port_elements(p, facts).or_else(|| kept_elements(p, facts, in_force));
        let Some(elements) = resolved else {
            unresolved.push(unresolved_note(p));
            continue;
        };
        elements.into_iter().for_each(&mut push);
        if p.allow_from.is_some() {
            groups.entry(group_of(p)).or_default().push(p);
        }
    }
    for (group, ports) in groups {
        allow_elements(group, ports.into_iter())
            .into_iter()
            .for_each(&mut push);
    }
    for (filter, s4, s6) in [
        (spec.input.as_ref().map(|f| &f.allow), &INPUT4, &INPUT6),
        (
            spec.forward.as_ref().map(|f| &f.allow),
            &FORWARD4,
            &FORWARD6,
        ),
    ] {
        if let Some(rules) = filter {
            let [b4, b6] = filter_boxes(rules);
            for (set, boxes) in [(s4, b4), (s6, b6)] {
                merge_boxes(boxes).for_each(|k| push((set, k, Bytes::new())));
            }
        }
    }
    let elements: BTreeMap<String, Elements> = lists
        .into_iter()
        .map(|(name, list)| (name.to_string(), list.into_iter().collect()))
        .collect();
    let mut structure = Structure::default();
    for c in &chains {
        structure.chains.insert(
            c.name.to_string(),
            ChainState {
                hook: c.hook,
                rules: rules
                    .iter()
                    .filter(|r| r.chain == c.name)
                    .map(|r| r.tag.clone())
                    .collect(),
            },
        );
    }
    for s in &sets {
        structure.sets.insert(s.name.to_string(), s.shape());
    }
    Desired {
        snapshot: Snapshot {
            exists: true,
            structure,
            elements,
        },
        chains,
        sets,
        rules,
        unresolved,
    }
}
