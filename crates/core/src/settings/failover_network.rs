//! `Msvm_FailoverNetworkAdapterSettingData` (spec §9): the guest IP settings a VM should take when
//! it runs after a failover. Hyper-V injects them through the KVP integration component; a KVM
//! host has none, so the daemon keeps them, shows them, and hands them to the VM's start command
//! when a failed-over replica starts (`VMREPLICA_FAILOVER_NETWORK`; ARCHITECTURE.md).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::SettingsError;

/// `ProtocolIFType` values (spec §4.2).
pub const PROTOCOL_IPV4: u16 = 4096;
pub const PROTOCOL_IPV6: u16 = 4097;
pub const PROTOCOL_IPV4_V6: u16 = 4098;
/// Network adapters a VM may have settings for (0 to 63).
pub const MAX_ADAPTERS: u32 = 64;
/// At most this many default gateways (spec §9) and, by our own limit, addresses and servers.
pub const MAX_GATEWAYS: usize = 5;
const MAX_ADDRESSES: usize = 32;

/// The failover IP settings of one network adapter of a VM for one protocol.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FailoverNetworkSettings {
    /// The VM's network adapter, in the order its start command creates them (0 = the first).
    pub adapter: u32,
    /// 4096 IPv4, 4097 IPv6, 4098 both (0 or 1, unknown or other, are resolved from the addresses
    /// by [`FailoverNetworkSettings::normalized`]).
    pub protocol_if_type: u16,
    pub dhcp_enabled: bool,
    pub ip_addresses: Vec<String>,
    /// Element-wise with `ip_addresses`: a dotted IPv4 mask (255.255.255.0) or a prefix length.
    pub subnets: Vec<String>,
    pub default_gateways: Vec<String>,
    pub dns_servers: Vec<String>,
}

fn address(property: &'static str, text: &str) -> Result<IpAddr, SettingsError> {
    text.trim()
        .parse()
        .map_err(|_| SettingsError::invalid(property, format!("'{text}' is not an IP address.")))
}

/// The prefix length a subnet stands for, checked against the address it goes with.
fn prefix_length(subnet: &str, of: &IpAddr) -> Result<u8, SettingsError> {
    let bad = |why: &str| {
        SettingsError::invalid(
            "Subnets",
            format!("'{subnet}' is not a subnet of {of}: {why}."),
        )
    };
    let max = if of.is_ipv4() { 32 } else { 128 };
    let text = subnet.trim().trim_start_matches('/');
    if let Ok(n) = text.parse::<u8>() {
        return if n <= max {
            Ok(n)
        } else {
            Err(bad(&format!("a prefix length is at most {max}")))
        };
    }
    match (text.parse::<IpAddr>(), of) {
        (Ok(IpAddr::V4(mask)), IpAddr::V4(_)) => {
            let bits = u32::from(mask);
            if bits.leading_ones() + bits.trailing_zeros() == 32 {
                Ok(bits.leading_ones() as u8)
            } else {
                Err(bad("the mask's ones are not contiguous"))
            }
        }
        _ => Err(bad(
            "give a prefix length, or a dotted mask for an IPv4 address",
        )),
    }
}

/// An IPv4 prefix length as the dotted mask Hyper-V shows (`24` → `255.255.255.0`).
pub fn ipv4_mask(prefix: &str) -> Option<String> {
    let n: u32 = prefix.parse().ok().filter(|n| *n <= 32)?;
    let bits = u32::MAX.checked_shl(32 - n).unwrap_or(0);
    Some(std::net::Ipv4Addr::from(bits).to_string())
}

impl FailoverNetworkSettings {
    /// Whether these settings ask for nothing to be set: storing them clears the adapter's
    /// settings for that protocol, as `Set-VMNetworkAdapterFailoverConfiguration
    /// -ClearFailoverIPv4Settings` does. IPv4: DHCP and nothing else; IPv6 (where DHCPEnabled
    /// means nothing, spec §9): nothing at all.
    pub fn is_clear(&self) -> bool {
        (self.dhcp_enabled || self.protocol_if_type == PROTOCOL_IPV6)
            && self.ip_addresses.is_empty()
            && self.subnets.is_empty()
            && self.default_gateways.is_empty()
            && self.dns_servers.is_empty()
    }

    /// Checks every value and returns the settings as stored: one entry per protocol (a mixed
    /// entry, 4098 or addresses of both families, is split into its IPv4 and IPv6 parts, as
    /// Hyper-V keeps one instance per protocol), trimmed addresses, subnets as prefix lengths, and
    /// the protocol resolved from the addresses when it was 0 or 1. A static IPv4 setting needs an
    /// address; an IPv6 one may name only gateways or DNS servers (the guest configures itself).
    pub fn normalized(&self) -> Result<Vec<FailoverNetworkSettings>, SettingsError> {
        if self.adapter >= MAX_ADAPTERS {
            return Err(SettingsError::invalid(
                "InstanceID",
                format!(
                    "adapter {} is past the last one a VM may have ({}).",
                    self.adapter,
                    MAX_ADAPTERS - 1
                ),
            ));
        }
        let ips = self
            .ip_addresses
            .iter()
            .map(|a| address("IPAddresses", a))
            .collect::<Result<Vec<_>, _>>()?;
        let gateways = self
            .default_gateways
            .iter()
            .map(|a| address("DefaultGateways", a))
            .collect::<Result<Vec<_>, _>>()?;
        let dns = self
            .dns_servers
            .iter()
            .map(|a| address("DNSServers", a))
            .collect::<Result<Vec<_>, _>>()?;
        if ips.len() > MAX_ADDRESSES || dns.len() > MAX_ADDRESSES {
            return Err(SettingsError::invalid(
                "IPAddresses",
                format!("at most {MAX_ADDRESSES} addresses and {MAX_ADDRESSES} DNS servers."),
            ));
        }
        if gateways.len() > MAX_GATEWAYS {
            return Err(SettingsError::invalid(
                "DefaultGateways",
                format!("at most {MAX_GATEWAYS} default gateways."),
            ));
        }
        if self.subnets.len() != ips.len() {
            return Err(SettingsError::invalid(
                "Subnets",
                format!(
                    "one subnet per address, element-wise: {} addresses, {} subnets.",
                    ips.len(),
                    self.subnets.len()
                ),
            ));
        }
        let prefixes = self
            .subnets
            .iter()
            .zip(&ips)
            .map(|(s, ip)| prefix_length(s, ip).map(|n| n.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        let all: Vec<&IpAddr> = ips.iter().chain(&gateways).chain(&dns).collect();
        let (v4, v6) = (
            all.iter().any(|a| a.is_ipv4()),
            all.iter().any(|a| a.is_ipv6()),
        );
        let families: &[u16] = match self.protocol_if_type {
            0 | 1 => match (v4, v6) {
                (true, true) => &[PROTOCOL_IPV4, PROTOCOL_IPV6],
                (false, true) => &[PROTOCOL_IPV6],
                _ => &[PROTOCOL_IPV4],
            },
            PROTOCOL_IPV4 if v6 => {
                return Err(SettingsError::invalid(
                    "ProtocolIFType",
                    "4096 (IPv4) with an IPv6 address; use 4097 or 4098.",
                ))
            }
            PROTOCOL_IPV6 if v4 => {
                return Err(SettingsError::invalid(
                    "ProtocolIFType",
                    "4097 (IPv6) with an IPv4 address; use 4096 or 4098.",
                ))
            }
            PROTOCOL_IPV4 => &[PROTOCOL_IPV4],
            PROTOCOL_IPV6 => &[PROTOCOL_IPV6],
            PROTOCOL_IPV4_V6 => &[PROTOCOL_IPV4, PROTOCOL_IPV6],
            other => {
                return Err(SettingsError::invalid(
                    "ProtocolIFType",
                    format!("must be 0, 1, 4096, 4097 or 4098; got {other}."),
                ))
            }
        };
        let mut out = Vec::new();
        for &protocol in families {
            let of = |a: &&IpAddr| a.is_ipv4() == (protocol == PROTOCOL_IPV4);
            let texts = |list: &[IpAddr]| list.iter().filter(of).map(ToString::to_string).collect();
            let part = FailoverNetworkSettings {
                adapter: self.adapter,
                protocol_if_type: protocol,
                // DHCPEnabled is an IPv4 setting (spec §9).
                dhcp_enabled: self.dhcp_enabled && protocol == PROTOCOL_IPV4,
                ip_addresses: texts(&ips),
                subnets: ips
                    .iter()
                    .zip(&prefixes)
                    .filter(|(a, _)| of(a))
                    .map(|(_, p)| p.clone())
                    .collect(),
                default_gateways: texts(&gateways),
                dns_servers: texts(&dns),
            };
            if protocol == PROTOCOL_IPV4 && !part.dhcp_enabled && part.ip_addresses.is_empty() {
                return Err(SettingsError::invalid(
                    "IPAddresses",
                    "without DHCP a static IPv4 setting needs at least one address.",
                ));
            }
            out.push(part);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v4() -> FailoverNetworkSettings {
        FailoverNetworkSettings {
            adapter: 0,
            protocol_if_type: 0,
            dhcp_enabled: false,
            ip_addresses: vec![" 10.1.2.3".into()],
            subnets: vec!["255.255.255.0".into()],
            default_gateways: vec!["10.1.2.1".into()],
            dns_servers: vec!["10.1.2.53".into()],
        }
    }

    #[test]
    fn good_settings_are_normalized() {
        let n = v4().normalized().unwrap();
        assert_eq!(n.len(), 1);
        assert_eq!(n[0].protocol_if_type, PROTOCOL_IPV4);
        assert_eq!(n[0].ip_addresses, ["10.1.2.3"]);
        assert_eq!(n[0].subnets, ["24"]);
        assert_eq!(
            ipv4_mask(&n[0].subnets[0]).as_deref(),
            Some("255.255.255.0")
        );
        assert_eq!(ipv4_mask("0").as_deref(), Some("0.0.0.0"));
        assert_eq!(ipv4_mask("32").as_deref(), Some("255.255.255.255"));
        let mut six = v4();
        six.ip_addresses = vec!["2001:db8::5".into()];
        six.subnets = vec!["/64".into()];
        six.default_gateways = vec!["fe80::1".into()];
        six.dns_servers.clear();
        let n = six.normalized().unwrap();
        assert_eq!(
            (n[0].protocol_if_type, n[0].subnets[0].as_str()),
            (PROTOCOL_IPV6, "64")
        );
        // IPv4 addresses with an IPv6 DNS server: two entries, one per protocol.
        let mut mixed = v4();
        mixed.dns_servers.push("2001:db8::53".into());
        let n = mixed.normalized().unwrap();
        assert_eq!(n.len(), 2);
        assert_eq!(
            (n[0].protocol_if_type, n[0].dns_servers.clone()),
            (PROTOCOL_IPV4, vec!["10.1.2.53".to_string()])
        );
        assert_eq!(
            (n[1].protocol_if_type, n[1].dns_servers.clone()),
            (PROTOCOL_IPV6, vec!["2001:db8::53".to_string()])
        );
        assert!(n[1].ip_addresses.is_empty() && !n[1].is_clear());
        let dhcp = FailoverNetworkSettings {
            dhcp_enabled: true,
            ..FailoverNetworkSettings::default()
        };
        assert!(dhcp.is_clear() && dhcp.normalized().unwrap()[0].is_clear());
        // An IPv6 clear needs no DHCPEnabled (an IPv4 setting).
        let six_clear = FailoverNetworkSettings {
            protocol_if_type: PROTOCOL_IPV6,
            ..FailoverNetworkSettings::default()
        };
        assert!(six_clear.normalized().unwrap()[0].is_clear());
    }

    #[test]
    fn bad_settings_name_the_property() {
        type Change = Box<dyn Fn(&mut FailoverNetworkSettings)>;
        let cases: Vec<(&str, Change)> = vec![
            (
                "IPAddresses",
                Box::new(|s| s.ip_addresses = vec!["10.1.2".into()]),
            ),
            (
                "IPAddresses",
                Box::new(|s| {
                    s.ip_addresses.clear();
                    s.subnets.clear();
                }),
            ),
            ("Subnets", Box::new(|s| s.subnets.clear())),
            (
                "Subnets",
                Box::new(|s| s.subnets = vec!["255.0.255.0".into()]),
            ),
            ("Subnets", Box::new(|s| s.subnets = vec!["33".into()])),
            (
                "DefaultGateways",
                Box::new(|s| s.default_gateways = vec!["10.0.0.1".into(); 6]),
            ),
            (
                "DNSServers",
                Box::new(|s| s.dns_servers = vec!["dns.example".into()]),
            ),
            (
                "ProtocolIFType",
                Box::new(|s| s.protocol_if_type = PROTOCOL_IPV6),
            ),
            ("ProtocolIFType", Box::new(|s| s.protocol_if_type = 7)),
            ("InstanceID", Box::new(|s| s.adapter = MAX_ADAPTERS)),
        ];
        for (property, change) in cases {
            let mut s = v4();
            change(&mut s);
            let e = s.normalized().unwrap_err();
            assert_eq!(e.property(), property, "{e}");
        }
    }
}
