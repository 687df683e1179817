//! Rule expressions as nf_tables netlink attributes: a builder of one rule's expression
//! list, with the expressions converge's tables use.

use super::{Attrs, NFPROTO_IPV4, NFPROTO_IPV6};

pub const R0: u32 = 8; // NFT_REG32_00: concatenations fill consecutive 32-bit registers
pub const NFT_REG_VERDICT: u32 = 0;
pub const NFTA_LIST_ELEM: u16 = 1;
pub const NF_DROP: i32 = 0;
pub const NF_ACCEPT: i32 = 1;
pub const NFT_JUMP: i32 = -3;
pub const RTN_LOCAL: u32 = 2;
pub const META_IIF: u32 = 4;
pub const META_NFPROTO: u32 = 15;
pub const META_L4PROTO: u32 = 16;
pub const CT_STATE: u32 = 0;
pub const CT_STATUS: u32 = 2;
pub const CT_ESTABLISHED_RELATED: u32 = 2 | 4;
pub const IPS_DST_NAT: u32 = 0x20;
pub const PAYLOAD_NETWORK: u32 = 1;
pub const PAYLOAD_TRANSPORT: u32 = 2;
pub const CMP_EQ: u32 = 0;
pub const CMP_NEQ: u32 = 1;
pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const NFT_NAT_DNAT: u32 = 1;

/// Builder of one rule's expression list (the NFTA_RULE_EXPRESSIONS nest content).
#[derive(Default)]
pub struct Exprs(Attrs);

impl Exprs {
    pub fn into_bytes(self) -> Vec<u8> {
        self.0.into_bytes()
    }

    pub fn expr(&mut self, name: &str, f: impl FnOnce(&mut Attrs)) -> &mut Self {
        self.0.nest(NFTA_LIST_ELEM, |e| {
            e.str(1, name); // NFTA_EXPR_NAME
            e.nest(2, f); // NFTA_EXPR_DATA
        });
        self
    }

    pub fn meta(&mut self, key: u32, reg: u32) -> &mut Self {
        self.expr("meta", |a| {
            a.u32_be(1, reg).u32_be(2, key);
        })
    }

    pub fn payload(&mut self, base: u32, offset: u32, len: u32, reg: u32) -> &mut Self {
        self.expr("payload", |a| {
            a.u32_be(1, reg)
                .u32_be(2, base)
                .u32_be(3, offset)
                .u32_be(4, len);
        })
    }

    pub fn cmp(&mut self, op: u32, reg: u32, data: &[u8]) -> &mut Self {
        self.expr("cmp", |a| {
            a.u32_be(1, reg).u32_be(2, op).nest(3, |d| {
                d.bytes(1, data);
            });
        })
    }

    /// `value & mask != 0` on a 32-bit host-order register (ct state / status bits).
    pub fn bits_set(&mut self, reg: u32, mask: u32) -> &mut Self {
        self.expr("bitwise", |a| {
            a.u32_be(1, reg)
                .u32_be(2, reg)
                .u32_be(3, 4)
                .nest(4, |d| {
                    d.bytes(1, &mask.to_ne_bytes());
                })
                .nest(5, |d| {
                    d.bytes(1, &[0; 4]);
                });
        })
        .cmp(CMP_NEQ, reg, &[0; 4])
    }

    pub fn ct(&mut self, key: u32, reg: u32) -> &mut Self {
        self.expr("ct", |a| {
            a.u32_be(1, reg).u32_be(2, key);
        })
    }

    /// `fib <saddr|daddr> type [!=] local`.
    pub fn fib_local(&mut self, daddr: bool, local: bool) -> &mut Self {
        self.expr("fib", |a| {
            a.u32_be(1, R0)
                .u32_be(2, 3)
                .u32_be(3, if daddr { 2 } else { 1 });
        })
        .cmp(
            if local { CMP_EQ } else { CMP_NEQ },
            R0,
            &RTN_LOCAL.to_ne_bytes(),
        )
    }

    pub fn nfproto(&mut self, v6: bool) -> &mut Self {
        let p = if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
        self.meta(META_NFPROTO, R0).cmp(CMP_EQ, R0, &[p])
    }

    pub fn l4proto_is(&mut self, p: u8) -> &mut Self {
        self.meta(META_L4PROTO, R0).cmp(CMP_EQ, R0, &[p])
    }

    /// `th dport == port` (TCP/UDP destination port).
    pub fn dport_is(&mut self, port: u16) -> &mut Self {
        self.payload(PAYLOAD_TRANSPORT, 2, 2, R0)
            .cmp(CMP_EQ, R0, &port.to_be_bytes())
    }

    /// Loads `data` into `reg`.
    pub fn immediate(&mut self, reg: u32, data: &[u8]) -> &mut Self {
        self.expr("immediate", |a| {
            a.u32_be(1, reg).nest(2, |d| {
                d.bytes(1, data);
            });
        })
    }

    pub fn lookup(&mut self, set: &str, dreg: Option<u32>, invert: bool) -> &mut Self {
        self.expr("lookup", |a| {
            a.str(1, set).u32_be(2, R0);
            if let Some(d) = dreg {
                a.u32_be(3, d);
            }
            if invert {
                a.u32_be(5, 1); // NFT_LOOKUP_F_INV
            }
        })
    }

    /// Destination NAT of the `v6` (or IPv4) packets: the address from `addr_reg` (kept
    /// when `None`), the port from `port_reg`.
    pub fn dnat(&mut self, v6: bool, addr_reg: Option<u32>, port_reg: u32) -> &mut Self {
        let family = if v6 { NFPROTO_IPV6 } else { NFPROTO_IPV4 };
        self.expr("nat", |a| {
            a.u32_be(1, NFT_NAT_DNAT).u32_be(2, family as u32);
            if let Some(r) = addr_reg {
                a.u32_be(3, r);
            }
            a.u32_be(5, port_reg);
        })
    }

    pub fn verdict(&mut self, code: i32, chain: Option<&str>) -> &mut Self {
        self.expr("immediate", |a| {
            a.u32_be(1, NFT_REG_VERDICT).nest(2, |d| {
                d.nest(2, |v| {
                    v.u32_be(1, code as u32);
                    if let Some(c) = chain {
                        v.str(2, c);
                    }
                });
            });
        })
    }

    pub fn masquerade(&mut self) -> &mut Self {
        self.expr("masq", |_| {})
    }
}
