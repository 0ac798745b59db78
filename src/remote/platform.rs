//! Can this binary run on that host? The controller uploads its own executable as the agent,
//! so before it does, it compares what the executable needs with what the host has:
//!
//! - the CPU architecture: the ELF header's `e_machine` against the host's `uname -m`;
//! - the GNU C library: the highest `GLIBC_x.y` among the ELF's version-needed entries
//!   (`.gnu.version_r`, what `readelf -V` lists and what the dynamic loader checks before
//!   `main`) against the host's `getconf GNU_LIBC_VERSION` (or `ldd --version`). A static or
//!   musl binary has no such entry and needs none.
//!
//! Without this, a binary built on a newer Debian fails on an older host inside the loader
//! ("version `GLIBC_2.34' not found"), after the upload, with a message that names neither
//! the cause nor the fix.
//!
//! Pure: parsing and comparison, no I/O. `agent.rs` runs the probe and reads the file.

use std::fmt;

/// A GNU libc version, compared as numbers (2.31 < 2.34, 2.9 < 2.10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct GlibcVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl GlibcVersion {
    /// "2.31", "2.3.4", or "2.31-13+deb11u5" (Debian's `ldd --version`); the package
    /// revision after `-` is not part of the version.
    pub fn parse(text: &str) -> Option<GlibcVersion> {
        let text = text.split('-').next()?;
        let mut parts = text.split('.');
        let number = |p: Option<&str>| -> Option<u32> {
            match p {
                Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok(),
                _ => None,
            }
        };
        let major = number(parts.next())?;
        let minor = number(parts.next())?;
        let patch = match parts.next() {
            None => 0,
            p => number(p)?,
        };
        if parts.next().is_some() {
            return None;
        }
        Some(GlibcVersion {
            major,
            minor,
            patch,
        })
    }
}

impl fmt::Display for GlibcVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)?;
        if self.patch != 0 {
            write!(f, ".{}", self.patch)?;
        }
        Ok(())
    }
}

/// What an executable needs from the host it runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BinaryNeeds {
    /// The ELF header's `e_machine` (62 for x86_64).
    pub machine: u16,
    /// The newest GNU libc symbol version it links against; `None` for a static or musl
    /// binary.
    pub glibc: Option<GlibcVersion>,
}

/// Why an ELF could not be read; a bug or a damaged file, never the host's fault.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file")]
    NotElf,
    #[error("damaged ELF file: {0}")]
    Damaged(&'static str),
}

/// `uname -m` of the hosts that run binaries of this ELF machine (`e_machine`, from the
/// System V ABI's registry); the first name is the one shown.
fn machine_names(e_machine: u16) -> &'static [&'static str] {
    match e_machine {
        3 => &["i686", "i586", "i486", "i386"],
        8 => &["mips", "mips64"],
        20 => &["ppc"],
        21 => &["ppc64le", "ppc64"],
        22 => &["s390x"],
        40 => &["armv7l", "armv6l", "armv8l", "arm"],
        62 => &["x86_64"],
        183 => &["aarch64", "arm64"],
        243 => &["riscv64"],
        258 => &["loongarch64"],
        _ => &[],
    }
}

/// ELF constants (System V ABI, "gABI", and the LSB for the GNU extension).
const SHT_GNU_VERNEED: u32 = 0x6fff_fffe;
/// `Elf_Verneed` and `Elf_Vernaux` are the same size in ELF32 and ELF64 (LSB 4.1, "Symbol
/// Versioning"): 16 bytes each.
const VERNEED_SIZE: usize = 16;

/// Reads fixed-width fields from a byte slice in the file's byte order.
struct Reader<'a> {
    bytes: &'a [u8],
    big_endian: bool,
}

impl Reader<'_> {
    fn get<const N: usize>(&self, at: u64) -> Result<[u8; N], ElfError> {
        let at = usize::try_from(at).map_err(|_| ElfError::Damaged("offset out of range"))?;
        let end = at
            .checked_add(N)
            .ok_or(ElfError::Damaged("offset out of range"))?;
        let slice = self
            .bytes
            .get(at..end)
            .ok_or(ElfError::Damaged("offset past the end of the file"))?;
        let mut out = [0u8; N];
        out.copy_from_slice(slice);
        if self.big_endian {
            out.reverse();
        }
        Ok(out)
    }
    fn u16(&self, at: u64) -> Result<u16, ElfError> {
        self.get::<2>(at).map(u16::from_le_bytes)
    }
    fn u32(&self, at: u64) -> Result<u32, ElfError> {
        self.get::<4>(at).map(u32::from_le_bytes)
    }
    fn u64(&self, at: u64) -> Result<u64, ElfError> {
        self.get::<8>(at).map(u64::from_le_bytes)
    }
    /// A NUL-terminated string at `at`.
    fn c_str(&self, at: u64) -> Result<&[u8], ElfError> {
        let at = usize::try_from(at).map_err(|_| ElfError::Damaged("offset out of range"))?;
        let rest = self
            .bytes
            .get(at..)
            .ok_or(ElfError::Damaged("string past the end of the file"))?;
        let len = rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(ElfError::Damaged("unterminated string"))?;
        Ok(&rest[..len])
    }
}

/// A section header's fields that matter here.
struct Section {
    kind: u32,
    offset: u64,
    size: u64,
    link: u32,
    /// For `SHT_GNU_VERNEED`: the number of `Elf_Verneed` entries.
    info: u32,
}

impl BinaryNeeds {
    /// `uname -m`'s name for the machine ("x86_64", "aarch64", …), or `ELF machine N`.
    pub fn arch(&self) -> String {
        match machine_names(self.machine).first() {
            Some(name) => name.to_string(),
            None => format!("ELF machine {}", self.machine),
        }
    }

    /// Reads an executable's architecture and glibc needs from its bytes.
    pub fn from_elf(bytes: &[u8]) -> Result<BinaryNeeds, ElfError> {
        if bytes.get(..4) != Some(b"\x7fELF") {
            return Err(ElfError::NotElf);
        }
        let wide = match bytes.get(4) {
            Some(1) => false,
            Some(2) => true,
            _ => return Err(ElfError::Damaged("unknown ELF class")),
        };
        let big_endian = match bytes.get(5) {
            Some(1) => false,
            Some(2) => true,
            _ => return Err(ElfError::Damaged("unknown byte order")),
        };
        let r = Reader { bytes, big_endian };
        let machine = r.u16(18)?;
        // e_shoff, e_shentsize, e_shnum: the section header table.
        let (shoff, shentsize, shnum) = if wide {
            (r.u64(0x28)?, r.u16(0x3a)?, r.u16(0x3c)?)
        } else {
            (u64::from(r.u32(0x20)?), r.u16(0x2e)?, r.u16(0x30)?)
        };
        let section = |i: u32| -> Result<Section, ElfError> {
            let at = shoff
                .checked_add(u64::from(i) * u64::from(shentsize))
                .ok_or(ElfError::Damaged("section header out of range"))?;
            Ok(if wide {
                Section {
                    kind: r.u32(at + 4)?,
                    offset: r.u64(at + 24)?,
                    size: r.u64(at + 32)?,
                    link: r.u32(at + 40)?,
                    info: r.u32(at + 44)?,
                }
            } else {
                Section {
                    kind: r.u32(at + 4)?,
                    offset: u64::from(r.u32(at + 16)?),
                    size: u64::from(r.u32(at + 20)?),
                    link: r.u32(at + 24)?,
                    info: r.u32(at + 28)?,
                }
            })
        };
        let mut glibc = None;
        for i in 0..u32::from(shnum) {
            let verneed = section(i)?;
            if verneed.kind != SHT_GNU_VERNEED {
                continue;
            }
            if u32::from(shnum) <= verneed.link {
                return Err(ElfError::Damaged("version section links to no section"));
            }
            let strtab = section(verneed.link)?;
            let name = |offset: u32| -> Result<&[u8], ElfError> {
                if u64::from(offset) >= strtab.size {
                    return Err(ElfError::Damaged("version name outside its string table"));
                }
                r.c_str(strtab.offset + u64::from(offset))
            };
            let end = verneed.offset.saturating_add(verneed.size);
            let inside = |at: u64| -> Result<u64, ElfError> {
                if at < verneed.offset || at.saturating_add(VERNEED_SIZE as u64) > end {
                    Err(ElfError::Damaged("version entry outside its section"))
                } else {
                    Ok(at)
                }
            };
            // The counts bound the walk, so a `next` that loops cannot make it endless.
            let mut need = verneed.offset;
            for _ in 0..verneed.info {
                let need_at = inside(need)?;
                let count = r.u16(need_at + 2)?;
                let mut aux = need_at + u64::from(r.u32(need_at + 8)?);
                for _ in 0..count {
                    let aux_at = inside(aux)?;
                    let version = name(r.u32(aux_at + 8)?)?;
                    if let Some(v) = version
                        .strip_prefix(b"GLIBC_")
                        .and_then(|v| std::str::from_utf8(v).ok())
                        .and_then(GlibcVersion::parse)
                    {
                        glibc = glibc.max(Some(v));
                    }
                    let next = r.u32(aux_at + 12)?;
                    if next == 0 {
                        break;
                    }
                    aux = aux_at + u64::from(next);
                }
                let next = r.u32(need_at + 12)?;
                if next == 0 {
                    break;
                }
                need = need_at + u64::from(next);
            }
        }
        Ok(BinaryNeeds { machine, glibc })
    }
}

/// The C library a host has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostLibc {
    Glibc(GlibcVersion),
    /// Something else, as the host described it ("musl libc (x86_64)"), or nothing.
    Other(String),
}

impl fmt::Display for HostLibc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostLibc::Glibc(v) => write!(f, "glibc {v}"),
            HostLibc::Other(what) if what.is_empty() => write!(f, "no GNU libc"),
            HostLibc::Other(what) => write!(f, "no GNU libc ({what})"),
        }
    }
}

/// What a host is, from the output of `PLATFORM_PROBE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPlatform {
    /// `uname -m`.
    pub arch: String,
    pub libc: HostLibc,
}

/// Prints the host's `uname -m` on the first line and its C library on the second:
/// `glibc 2.31` from `getconf GNU_LIBC_VERSION`, or else the first line of `ldd --version`
/// (musl's `ldd` writes it to stderr), or nothing.
pub const PLATFORM_PROBE: &str =
    "uname -m; getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n 1 || true";

impl HostPlatform {
    pub fn parse(probe_output: &str) -> Option<HostPlatform> {
        let mut lines = probe_output.lines().map(str::trim);
        let arch = lines.next().filter(|a| !a.is_empty())?.to_string();
        let libc_line = lines.next().unwrap_or("");
        let lower = libc_line.to_ascii_lowercase();
        // `getconf`: "glibc 2.31". `ldd --version`: "ldd (Debian GLIBC 2.31-13+deb11u5) 2.31"
        // or "ldd (GNU libc) 2.17": the version is the last word.
        let glibc = if let Some(v) = lower.strip_prefix("glibc ") {
            GlibcVersion::parse(v.trim())
        } else if lower.contains("glibc") || lower.contains("gnu libc") {
            lower
                .split_whitespace()
                .last()
                .and_then(GlibcVersion::parse)
        } else {
            None
        };
        let libc = match glibc {
            Some(v) => HostLibc::Glibc(v),
            None => HostLibc::Other(libc_line.to_string()),
        };
        Some(HostPlatform { arch, libc })
    }
}

/// Why the binary cannot run on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mismatch {
    Arch { binary: String, host: String },
    Glibc { needs: GlibcVersion, host: HostLibc },
}

/// `None` when a binary with `needs` runs on `host`.
/// A machine missing from `machine_names` cannot be compared and passes: the loader then
/// has the last word, as it had before this check.
pub fn mismatch(needs: &BinaryNeeds, host: &HostPlatform) -> Option<Mismatch> {
    let names = machine_names(needs.machine);
    if !names.is_empty() && !names.contains(&host.arch.as_str()) {
        return Some(Mismatch::Arch {
            binary: needs.arch(),
            host: host.arch.clone(),
        });
    }
    let needed = needs.glibc?;
    match &host.libc {
        HostLibc::Glibc(has) if *has >= needed => None,
        other => Some(Mismatch::Glibc {
            needs: needed,
            host: other.clone(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(text: &str) -> GlibcVersion {
        GlibcVersion::parse(text).unwrap()
    }

    #[test]
    fn glibc_versions_compare_as_numbers() {
        assert!(v("2.31") < v("2.34"));
        assert!(v("2.9") < v("2.10"));
        assert!(v("2.3.4") > v("2.3"));
        assert!(v("2.3.4") < v("2.4"));
        assert_eq!(v("2.31-13+deb11u5"), v("2.31"));
        assert_eq!(v("2.2.5").to_string(), "2.2.5");
        assert_eq!(v("2.36").to_string(), "2.36");
        for bad in ["", "2", "2.", "x.31", "2.31.1.1", "2.-1", " 2.31"] {
            assert_eq!(GlibcVersion::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn the_host_probe_is_read_from_getconf_or_ldd() {
        let host = |out: &str| HostPlatform::parse(out).unwrap();
        assert_eq!(
            host("x86_64\nglibc 2.31\n"),
            HostPlatform {
                arch: "x86_64".into(),
                libc: HostLibc::Glibc(v("2.31"))
            }
        );
        assert_eq!(
            host("x86_64\nldd (Debian GLIBC 2.31-13+deb11u5) 2.31\n").libc,
            HostLibc::Glibc(v("2.31"))
        );
        assert_eq!(
            host("x86_64\nldd (GNU libc) 2.17\n").libc,
            HostLibc::Glibc(v("2.17"))
        );
        assert_eq!(
            host("aarch64\nmusl libc (aarch64)\n").libc,
            HostLibc::Other("musl libc (aarch64)".into())
        );
        assert_eq!(host("x86_64\n").libc, HostLibc::Other(String::new()));
        assert_eq!(HostPlatform::parse(""), None);
        assert_eq!(
            HostLibc::Other("musl libc (aarch64)".into()).to_string(),
            "no GNU libc (musl libc (aarch64))"
        );
    }

    fn needs(machine: u16, glibc: Option<&str>) -> BinaryNeeds {
        BinaryNeeds {
            machine,
            glibc: glibc.map(v),
        }
    }

    const X86_64: u16 = 62;
    const AARCH64: u16 = 183;

    fn host(arch: &str, libc: HostLibc) -> HostPlatform {
        HostPlatform {
            arch: arch.into(),
            libc,
        }
    }

    #[test]
    fn a_binary_needing_a_newer_glibc_than_the_host_has_is_refused() {
        // Built on Debian 12 (2.36 links __libc_start_main@GLIBC_2.34), host Debian 11.
        let bullseye = host("x86_64", HostLibc::Glibc(v("2.31")));
        assert_eq!(
            mismatch(&needs(X86_64, Some("2.34")), &bullseye),
            Some(Mismatch::Glibc {
                needs: v("2.34"),
                host: HostLibc::Glibc(v("2.31"))
            })
        );
        assert_eq!(mismatch(&needs(X86_64, Some("2.31")), &bullseye), None);
        assert_eq!(mismatch(&needs(X86_64, Some("2.30")), &bullseye), None);
        assert_eq!(
            mismatch(
                &needs(X86_64, Some("2.17")),
                &host("x86_64", HostLibc::Other("musl libc (x86_64)".into()))
            ),
            Some(Mismatch::Glibc {
                needs: v("2.17"),
                host: HostLibc::Other("musl libc (x86_64)".into())
            })
        );
    }

    #[test]
    fn a_static_binary_needs_only_the_architecture() {
        let musl_host = host("x86_64", HostLibc::Other("musl libc (x86_64)".into()));
        assert_eq!(mismatch(&needs(X86_64, None), &musl_host), None);
        assert_eq!(
            mismatch(
                &needs(X86_64, None),
                &host("aarch64", HostLibc::Other("".into()))
            ),
            Some(Mismatch::Arch {
                binary: "x86_64".into(),
                host: "aarch64".into()
            })
        );
        // uname -m names the same architecture in more than one way.
        let arm = host("arm64", HostLibc::Glibc(v("2.36")));
        assert_eq!(mismatch(&needs(AARCH64, Some("2.17")), &arm), None);
    }

    /// This test binary is linked like relaymove itself: against the build machine's glibc.
    #[test]
    fn this_executable_is_read() {
        let bytes = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let needs = BinaryNeeds::from_elf(&bytes).unwrap();
        if cfg!(target_arch = "x86_64") {
            assert_eq!(needs.arch(), "x86_64");
        }
        if cfg!(all(target_os = "linux", target_env = "gnu")) {
            let glibc = needs
                .glibc
                .expect("a glibc build needs some GLIBC_ version");
            assert!(glibc >= v("2.2.5"), "{glibc}");
        }
    }

    /// A minimal ELF with one `.gnu.version_r` naming `versions` of libc.so.6 (split over two
    /// `Elf_Verneed` entries, as real binaries list libc.so.6, libm.so.6, …), `.dynstr` and
    /// the section table; `wide` for ELF64, else ELF32.
    fn elf(wide: bool, big_endian: bool, machine: u16, versions: &[&str]) -> Vec<u8> {
        let put16 = |b: &mut Vec<u8>, at: usize, x: u16| {
            let bytes = if big_endian {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            };
            b[at..at + 2].copy_from_slice(&bytes);
        };
        let put32 = |b: &mut Vec<u8>, at: usize, x: u32| {
            let bytes = if big_endian {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            };
            b[at..at + 4].copy_from_slice(&bytes);
        };
        let put64 = |b: &mut Vec<u8>, at: usize, x: u64| {
            let bytes = if big_endian {
                x.to_be_bytes()
            } else {
                x.to_le_bytes()
            };
            b[at..at + 8].copy_from_slice(&bytes);
        };
        // .dynstr: "\0libc.so.6\0" then each version name.
        let mut dynstr = b"\0libc.so.6\0".to_vec();
        let mut names = Vec::new();
        for v in versions {
            names.push(dynstr.len() as u32);
            dynstr.extend_from_slice(v.as_bytes());
            dynstr.push(0);
        }
        // .gnu.version_r: the versions split into two Elf_Verneed, each followed by its
        // Elf_Vernaux entries.
        let halves: Vec<&[u32]> = if names.len() > 1 {
            let (a, b) = names.split_at(names.len() / 2);
            vec![a, b]
        } else {
            vec![&names[..]]
        };
        let mut verneed = Vec::new();
        for (i, half) in halves.iter().enumerate() {
            let start = verneed.len();
            verneed.resize(start + VERNEED_SIZE * (1 + half.len()), 0);
            let is_last = i + 1 == halves.len();
            put16(&mut verneed, start, 1);
            put16(&mut verneed, start + 2, half.len() as u16);
            put32(&mut verneed, start + 4, 1);
            put32(&mut verneed, start + 8, VERNEED_SIZE as u32);
            let next = if is_last {
                0
            } else {
                (VERNEED_SIZE * (1 + half.len())) as u32
            };
            put32(&mut verneed, start + 12, next);
            for (j, name) in half.iter().enumerate() {
                let at = start + VERNEED_SIZE * (1 + j);
                put32(&mut verneed, at + 8, *name);
                let next = if j + 1 == half.len() {
                    0
                } else {
                    VERNEED_SIZE as u32
                };
                put32(&mut verneed, at + 12, next);
            }
        }
        let header = if wide { 64 } else { 52 };
        let shentsize = if wide { 64 } else { 40 };
        let dynstr_at = header;
        let verneed_at = dynstr_at + dynstr.len();
        let shoff = verneed_at + verneed.len();
        let mut b = vec![0u8; shoff + 3 * shentsize];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = if wide { 2 } else { 1 };
        b[5] = if big_endian { 2 } else { 1 };
        b[6] = 1;
        put16(&mut b, 16, 2);
        put16(&mut b, 18, machine);
        if wide {
            put64(&mut b, 0x28, shoff as u64);
            put16(&mut b, 0x3a, shentsize as u16);
            put16(&mut b, 0x3c, 3);
        } else {
            put32(&mut b, 0x20, shoff as u32);
            put16(&mut b, 0x2e, shentsize as u16);
            put16(&mut b, 0x30, 3);
        }
        b[dynstr_at..verneed_at].copy_from_slice(&dynstr);
        b[verneed_at..shoff].copy_from_slice(&verneed);
        // Section 0 is the null section; 1 is .dynstr (SHT_STRTAB); 2 is .gnu.version_r.
        let sections = [
            (3u32, dynstr_at, dynstr.len(), 0u32, 0u32),
            (
                SHT_GNU_VERNEED,
                verneed_at,
                verneed.len(),
                1,
                halves.len() as u32,
            ),
        ];
        for (i, (kind, offset, size, link, info)) in sections.into_iter().enumerate() {
            let at = shoff + (i + 1) * shentsize;
            put32(&mut b, at + 4, kind);
            if wide {
                put64(&mut b, at + 24, offset as u64);
                put64(&mut b, at + 32, size as u64);
                put32(&mut b, at + 40, link);
                put32(&mut b, at + 44, info);
            } else {
                put32(&mut b, at + 16, offset as u32);
                put32(&mut b, at + 20, size as u32);
                put32(&mut b, at + 24, link);
                put32(&mut b, at + 28, info);
            }
        }
        b
    }

    #[test]
    fn the_highest_glibc_version_needed_is_found_in_every_elf_flavour() {
        let versions = [
            "GLIBC_2.2.5",
            "GLIBC_2.34",
            "GLIBC_2.9",
            "GCC_3.0",
            "GLIBC_PRIVATE",
        ];
        for (wide, big_endian, machine, arch) in [
            (true, false, 62, "x86_64"),
            (true, false, 183, "aarch64"),
            (false, false, 3, "i686"),
            (true, true, 22, "s390x"),
            (false, true, 20, "ppc"),
            (true, false, 9999, "ELF machine 9999"),
        ] {
            let bytes = elf(wide, big_endian, machine, &versions);
            let read = BinaryNeeds::from_elf(&bytes);
            assert_eq!(
                read,
                Ok(needs(machine, Some("2.34"))),
                "wide {wide}, big-endian {big_endian}"
            );
            assert_eq!(read.unwrap().arch(), arch);
        }
    }

    #[test]
    fn an_elf_without_glibc_versions_needs_no_glibc() {
        assert_eq!(
            BinaryNeeds::from_elf(&elf(true, false, 62, &[])),
            Ok(needs(X86_64, None))
        );
        assert_eq!(
            BinaryNeeds::from_elf(&elf(true, false, 62, &["GCC_3.0"])),
            Ok(needs(X86_64, None))
        );
    }

    #[test]
    fn damaged_elf_files_are_errors_not_panics() {
        assert_eq!(BinaryNeeds::from_elf(b"#!/bin/sh\n"), Err(ElfError::NotElf));
        assert_eq!(BinaryNeeds::from_elf(b""), Err(ElfError::NotElf));
        let good = elf(true, false, 62, &["GLIBC_2.17", "GLIBC_2.34"]);
        // The section table is at the end, so every truncation cuts what is read (but the
        // last header's unread sh_addralign and sh_entsize, 16 bytes).
        for len in 0..good.len() - 16 {
            if let Ok(n) = BinaryNeeds::from_elf(&good[..len]) {
                panic!("{len} bytes read as {n:?}");
            }
        }
        // A count larger than the entries there are: the walk stops at the section's end.
        let mut overcounted = good.clone();
        let verneed_at = 64 + b"\0libc.so.6\0GLIBC_2.17\0GLIBC_2.34\0".len();
        overcounted[verneed_at + 2..verneed_at + 4].copy_from_slice(&u16::MAX.to_le_bytes());
        assert!(BinaryNeeds::from_elf(&overcounted).is_ok());
        // Every single flipped byte gives an answer or an error, never a panic.
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0xff;
            let _ = BinaryNeeds::from_elf(&bad);
        }
    }
}
