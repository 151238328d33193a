//! `--config FILE`: the devices a target serves, kept across restarts.
//! JSON: `{"devices": [{"name": "vm1", "socket": "...", "disk": "...",
//! "queues": "2", ...}, ...]}`, each device with the keys of `device_add`
//! (and of `--device`). A file that does not exist yet is no devices; the
//! first `config_save` creates it. It is written whole to a new file
//! beside it, synced, then renamed over it: a crash leaves the old file or
//! the new one, never half of one.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde_json::{json, Map, Value};

use crate::backend::DiskSpec;
use crate::device::DeviceSpec;

/// The largest configuration file read (1024 devices fit well within it).
const MAX_FILE: u64 = 16 << 20;

/// The file and whether every change is written to it at once.
#[derive(Clone, Debug)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub autosave: bool,
}

/// A device as its configuration entry: the keys of `device_add`, values
/// as text (the same parser reads them back).
pub fn spec_to_json(s: &DeviceSpec) -> Value {
    let mut m = Map::new();
    let mut put = |k: &str, v: String| {
        m.insert(k.to_string(), Value::String(v));
    };
    if let Some(n) = &s.name {
        put("name", n.clone());
    }
    put("socket", s.socket.to_string_lossy().into_owned());
    put("disk", s.disk.full_text());
    // An image's size is not kept: at the next start the image is opened
    // as it is, and one that has gone (storage not mounted yet) stops the
    // start rather than coming back empty.
    if let (Some(size), false) = (s.size, matches!(s.disk, DiskSpec::File(_))) {
        put("size", size.to_string());
    }
    put("queues", s.queues.to_string());
    put("queue-size", s.queue_size.to_string());
    put("serial", s.serial.clone());
    put("logical-block-size", s.logical_block_size.to_string());
    let on = |b: bool| if b { "on" } else { "off" }.to_string();
    put("readonly", on(s.readonly));
    put("direct", on(s.direct));
    put("discard", on(s.discard));
    put("write-zeroes", on(s.write_zeroes));
    put("packed", on(s.packed));
    put("force-share", on(s.force_share));
    if s.format_raw {
        put("format", "raw".into());
    }
    if let Some(d) = s.reconnect_delay {
        put("reconnect-delay", d.to_string());
    }
    let a = &s.socket_access;
    if let Some(mode) = a.mode {
        put("socket-mode", format!("{mode:04o}"));
    }
    if let Some(o) = a.owner {
        put("socket-owner", o.to_string());
    }
    if let Some(g) = a.group {
        put("socket-group", g.to_string());
    }
    for (k, v) in s.qos.named() {
        if v > 0 {
            put(k, v.to_string());
        }
    }
    Value::Object(m)
}

/// The devices of the file at `path`: none when it does not exist.
/// `parse` reads one entry (the management plane's `device_add` reader).
pub fn load(
    path: &Path,
    parse: impl Fn(Value) -> Result<DeviceSpec, String>,
) -> Result<Vec<DeviceSpec>> {
    // It names disks to open: a file another user planted or can swap
    // (in /tmp, in their folder) is refused, as an image would be.
    crate::util::check_path_is_ours(path, "configuration file").map_err(anyhow::Error::msg)?;
    let text = match std::fs::metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            log::info!(
                "{}: no such file yet; starting with no devices from it",
                path.display()
            );
            return Ok(Vec::new());
        }
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        Ok(m) if !m.is_file() => bail!("{} is not a file", path.display()),
        Ok(m) if m.len() > MAX_FILE => {
            bail!(
                "{} is {} bytes; at most {MAX_FILE}",
                path.display(),
                m.len()
            )
        }
        Ok(_) => {
            std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?
        }
    };
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let Some(obj) = v.as_object() else {
        bail!("{}: expected an object with \"devices\"", path.display());
    };
    if let Some(k) = obj.keys().find(|k| *k != "devices") {
        bail!(
            "{}: unknown key \"{k}\" (expected \"devices\")",
            path.display()
        );
    }
    let devices = match obj.get("devices") {
        None => return Ok(Vec::new()),
        Some(Value::Array(a)) => a,
        Some(_) => bail!("{}: \"devices\" must be a list", path.display()),
    };
    devices
        .iter()
        .enumerate()
        .map(|(i, d)| {
            parse(d.clone()).map_err(|e| anyhow::anyhow!("{}: device {i}: {e}", path.display()))
        })
        .collect()
}

/// Writes `devices` to `path` atomically, owner-only.
pub fn save(path: &Path, devices: &[&DeviceSpec]) -> Result<()> {
    let doc = json!({ "devices": devices.iter().map(|s| spec_to_json(s)).collect::<Vec<_>>() });
    // A link (checked at load as any path is) is written through: the
    // file it leads to is the configuration.
    let resolved = std::fs::canonicalize(path).ok();
    let path = resolved.as_deref().unwrap_or(path);
    let mut text = serde_json::to_string_pretty(&doc)?;
    text.push('\n');
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if path.file_name().is_none() {
        bail!("{} names no file", path.display());
    }
    // A name nobody can guess (in a shared folder another user could
    // otherwise hold it and make every save fail), and short whatever the
    // file's own name.
    let tmp = dir.join(format!(".vub-config.{:016x}.tmp", random_u64()?));
    let write = || -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        // The rename itself is durable once the folder is.
        std::fs::File::open(&dir)?.sync_all()?;
        Ok(())
    };
    write().inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn random_u64() -> Result<u64> {
    use std::io::Read;
    let mut b = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .context("reading /dev/urandom")?;
    Ok(u64::from_ne_bytes(b))
}

/// The spec a device has now, after a resize (what a restart recreates:
/// a memory disk of the new size; an image keeps its own).
pub fn resized(spec: &mut DeviceSpec, size: u64) {
    if let DiskSpec::Ram(s) | DiskSpec::Null(s) = &mut spec.disk {
        *s = size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_reads_back_as_the_same_device() {
        for text in [
            "socket=/run/a.sock,disk=/img/a.img,queues=2,serial=abc,readonly=on,direct=on",
            "socket=/run/r.sock,disk=rbd:pool/img:id=vub:key=AQBsecret==,iops=7",
            "socket=/run/b.sock,disk=ram:64M,name=b,packed=on,discard=off,write-zeroes=off",
            "socket=/run/c.sock,disk=null:1G,logical-block-size=4096,queue-size=128,iops=500,bps=10M",
            "socket=/run/d.sock,disk=nbd+unix:///exp?socket=/run/n.sock,reconnect-delay=3,write-bps=1M,read-bps=2M",
            "socket=/run/e,,x.sock,disk=/img/e,,1.img,socket-mode=0660,socket-group=0,format=raw",
        ] {
            let spec: DeviceSpec = text.parse().unwrap();
            let v = spec_to_json(&spec);
            // Back through the key=value reader, as device_add does it.
            let mut line = Vec::new();
            for (k, v) in v.as_object().unwrap() {
                line.push(format!("{k}={}", v.as_str().unwrap().replace(',', ",,")));
            }
            let back: DeviceSpec = line.join(",").parse().unwrap();
            assert_eq!(format!("{back:?}"), format!("{spec:?}"), "{text}");
        }
        // An image's creation size is not kept (a vanished image must not
        // come back empty); a memory disk's size is its disk.
        let spec: DeviceSpec = "socket=/s,disk=/img/a.img,size=1G".parse().unwrap();
        assert_eq!(spec_to_json(&spec).get("size"), None);
        let spec: DeviceSpec = "socket=/s,disk=rbd:p/i:key=AQBsecret==".parse().unwrap();
        assert!(spec_to_json(&spec)["disk"]
            .as_str()
            .unwrap()
            .contains("AQBsecret=="));
    }

    #[test]
    fn save_then_load_and_a_missing_file_is_no_devices() {
        let dir = std::env::temp_dir().join(format!("vub-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.json");
        let _ = std::fs::remove_file(&path);
        let parse = |v: Value| -> Result<DeviceSpec, String> {
            let m = v.as_object().ok_or("not an object")?;
            let line: Vec<String> = m
                .iter()
                .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                .collect();
            line.join(",").parse()
        };
        assert!(load(&path, parse).unwrap().is_empty());
        let a: DeviceSpec = "socket=/run/a.sock,disk=ram:1M,name=a".parse().unwrap();
        save(&path, &[&a]).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let got = load(&path, parse).unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].name.as_deref(), Some("a"));
        std::fs::write(&path, "{\"devices\": 3}").unwrap();
        assert!(load(&path, parse).is_err());
        std::fs::write(&path, "{\"disks\": []}").unwrap();
        assert!(load(&path, parse).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
