//! Byte layout of vfio-user messages: the 16-byte header, the fixed payload
//! structs, and little helpers to read and write little-endian fields.
//!
//! Everything is decoded field by field from byte slices, so no wire struct is
//! ever reinterpreted in place and no enum is read from the wire: unknown
//! values stay integers until a handler rejects them.

/// Size of the header that starts every message.
pub const HEADER_SIZE: usize = 16;
/// The header size as the wire's u32.
pub const HEADER_SIZE_U32: u32 = 16;

/// Command numbers (vfio-user spec, "Commands").
pub const CMD_VERSION: u16 = 1;
pub const CMD_DMA_MAP: u16 = 2;
pub const CMD_DMA_UNMAP: u16 = 3;
pub const CMD_DEVICE_GET_INFO: u16 = 4;
pub const CMD_DEVICE_GET_REGION_INFO: u16 = 5;
pub const CMD_DEVICE_GET_REGION_IO_FDS: u16 = 6;
pub const CMD_DEVICE_GET_IRQ_INFO: u16 = 7;
pub const CMD_DEVICE_SET_IRQS: u16 = 8;
pub const CMD_REGION_READ: u16 = 9;
pub const CMD_REGION_WRITE: u16 = 10;
pub const CMD_DMA_READ: u16 = 11;
pub const CMD_DMA_WRITE: u16 = 12;
pub const CMD_DEVICE_RESET: u16 = 13;

/// Header flag bits. These are vfio-user's own and not part of vfio-bindings.
pub const FLAG_TYPE_MASK: u32 = 0xf;
pub const FLAG_TYPE_COMMAND: u32 = 0;
pub const FLAG_TYPE_REPLY: u32 = 1;
pub const FLAG_NO_REPLY: u32 = 0x10;
pub const FLAG_ERROR: u32 = 0x20;

/// Fixed payload sizes of the requests we parse.
pub const DMA_MAP_SIZE: usize = 32;
pub const DMA_UNMAP_SIZE: usize = 24;
pub const DEVICE_INFO_SIZE: usize = 16;
pub const DEVICE_INFO_SIZE_U32: u32 = 16;
pub const REGION_INFO_SIZE: usize = 32;
pub const REGION_INFO_SIZE_U32: u32 = 32;
/// `vfio_info_cap_header` and the area count of a sparse-mmap capability
/// (its areas follow, 16 bytes each).
pub const SPARSE_CAP_HEADER: u32 = 16;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`, as its 16-bit wire field.
#[allow(clippy::cast_possible_truncation)]
pub const VFIO_REGION_INFO_CAP_SPARSE_MMAP_U16: u16 =
    vfio_bindings::bindings::vfio::VFIO_REGION_INFO_CAP_SPARSE_MMAP as u16;
const _: () = assert!(vfio_bindings::bindings::vfio::VFIO_REGION_INFO_CAP_SPARSE_MMAP < 0x10000);
pub const IRQ_INFO_SIZE: usize = 16;
pub const IRQ_INFO_SIZE_U32: u32 = 16;
pub const IRQ_SET_SIZE: usize = 20;
pub const REGION_ACCESS_SIZE: usize = 16;

/// The header of every message.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub msg_id: u16,
    pub command: u16,
    pub msg_size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        Header {
            msg_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            msg_size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    pub fn msg_type(&self) -> u32 {
        self.flags & FLAG_TYPE_MASK
    }

    pub fn no_reply(&self) -> bool {
        self.flags & FLAG_NO_REPLY != 0
    }
}

/// Reads a little-endian u32 at `off`; the caller has checked the length.
pub fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut v = [0u8; 4];
    v.copy_from_slice(&b[off..off + 4]);
    u32::from_le_bytes(v)
}

/// Reads a little-endian u64 at `off`; the caller has checked the length.
pub fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(v)
}

/// Appends little-endian fields to a reply payload.
pub trait PutLe {
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
}

impl PutLe for Vec<u8> {
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_le_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_le_bytes());
    }
}

/// The offset/region/count triple of REGION_READ and REGION_WRITE.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionAccess {
    pub offset: u64,
    pub region: u32,
    pub count: u32,
}

impl RegionAccess {
    pub fn decode(p: &[u8]) -> Option<RegionAccess> {
        if p.len() < REGION_ACCESS_SIZE {
            return None;
        }
        Some(RegionAccess {
            offset: u64_at(p, 0),
            region: u32_at(p, 8),
            count: u32_at(p, 12),
        })
    }

    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.put_u64(self.offset);
        out.put_u32(self.region);
        out.put_u32(self.count);
    }
}

/// A payload shorter than its command's fixed part.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("payload of {have} bytes, need {need}")]
pub struct Short {
    pub have: usize,
    pub need: usize,
}

fn need(p: &[u8], need: usize) -> Result<(), Short> {
    if p.len() < need {
        return Err(Short {
            have: p.len(),
            need,
        });
    }
    Ok(())
}

/// DMA_MAP's fixed part (the window's file comes as a descriptor).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMap {
    pub flags: u32,
    pub offset: u64,
    pub iova: u64,
    pub size: u64,
}

impl DmaMap {
    pub fn decode(p: &[u8]) -> Result<DmaMap, Short> {
        need(p, DMA_MAP_SIZE)?;
        Ok(DmaMap {
            flags: u32_at(p, 4),
            offset: u64_at(p, 8),
            iova: u64_at(p, 16),
            size: u64_at(p, 24),
        })
    }
}

/// DMA_UNMAP's fixed part (echoed back in the reply).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaUnmap {
    pub flags: u32,
    pub iova: u64,
    pub size: u64,
}

impl DmaUnmap {
    pub fn decode(p: &[u8]) -> Result<DmaUnmap, Short> {
        need(p, DMA_UNMAP_SIZE)?;
        Ok(DmaUnmap {
            flags: u32_at(p, 4),
            iova: u64_at(p, 8),
            size: u64_at(p, 16),
        })
    }
}

/// The question of DEVICE_GET_INFO, GET_REGION_INFO and GET_IRQ_INFO: the
/// room the client gives the reply (`argsz`), and the word at offset 8
/// (which region or interrupt index; GET_INFO's `num_regions`, unused).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InfoQuery {
    pub argsz: u32,
    pub index: u32,
}

impl InfoQuery {
    /// `size` is the command's fixed part (16 or more), which the reply
    /// also needs.
    pub fn decode(p: &[u8], size: usize) -> Result<InfoQuery, Short> {
        need(p, size.max(12))?;
        Ok(InfoQuery {
            argsz: u32_at(p, 0),
            index: u32_at(p, 8),
        })
    }
}

/// DEVICE_SET_IRQS' fixed part; what follows it is its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqSetHeader {
    pub flags: u32,
    pub index: u32,
    pub start: u32,
    pub count: u32,
}

impl IrqSetHeader {
    pub fn decode(p: &[u8]) -> Result<(IrqSetHeader, &[u8]), Short> {
        need(p, IRQ_SET_SIZE)?;
        let h = IrqSetHeader {
            flags: u32_at(p, 4),
            index: u32_at(p, 8),
            start: u32_at(p, 12),
            count: u32_at(p, 16),
        };
        Ok((h, &p[IRQ_SET_SIZE..]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = Header {
            msg_id: 0xbeef,
            command: CMD_REGION_WRITE,
            msg_size: 0x1234_5678,
            flags: FLAG_TYPE_REPLY | FLAG_ERROR,
            error: 22,
        };
        assert_eq!(Header::decode(&h.encode()), h);
        assert_eq!(h.msg_type(), FLAG_TYPE_REPLY);
        assert!(!h.no_reply());
    }

    #[test]
    fn region_access_needs_sixteen_bytes() {
        assert_eq!(RegionAccess::decode(&[0u8; 15]), None);
        let mut b = Vec::new();
        let a = RegionAccess {
            offset: 7,
            region: 2,
            count: 4,
        };
        a.encode_into(&mut b);
        assert_eq!(RegionAccess::decode(&b), Some(a));
    }

    #[test]
    fn fixed_parts_refuse_short_payloads_and_read_little_endian() {
        assert_eq!(
            DmaMap::decode(&[0u8; DMA_MAP_SIZE - 1]),
            Err(Short {
                have: DMA_MAP_SIZE - 1,
                need: DMA_MAP_SIZE
            })
        );
        let mut p = vec![0u8; DMA_MAP_SIZE];
        p[4] = 3;
        p[16] = 0x10;
        p[24] = 0x20;
        let m = DmaMap::decode(&p).unwrap();
        assert_eq!((m.flags, m.iova, m.size), (3, 0x10, 0x20));
        assert!(DmaUnmap::decode(&p[..DMA_UNMAP_SIZE - 1]).is_err());
        let q = InfoQuery::decode(&[16, 0, 0, 0, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0], 16).unwrap();
        assert_eq!((q.argsz, q.index), (16, 5));
        assert!(IrqSetHeader::decode(&[0u8; IRQ_SET_SIZE - 1]).is_err());
        let (_, rest) = IrqSetHeader::decode(&[0u8; IRQ_SET_SIZE + 2]).unwrap();
        assert_eq!(rest.len(), 2);
    }
}
