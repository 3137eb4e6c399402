//! The development webhook signing secret: made on the first `comfyq up`,
//! kept in the data directory (`webhook-secret`, mode 0600) and reused, so
//! every webhook `up` sends is signed and a receiver can keep verifying it
//! across restarts.

use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use comfyq_shared::config::Secret;

/// The file in the data directory.
pub(crate) const FILE: &str = "webhook-secret";

/// Whether [`load_or_create`] read the secret or made it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Origin {
    Existing,
    Created,
}

/// Reads `data_dir/webhook-secret`, or makes a new `whsec_…` secret there.
pub(crate) fn load_or_create(data_dir: &Path) -> anyhow::Result<(Secret, Origin)> {
    let path = data_dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let secret = text.trim().to_owned();
            if standardwebhooks::Webhook::new(&secret).is_err() {
                bail!(
                    "{} is not a webhook secret (`whsec_` followed by base64); \
                     delete it to have a new one made",
                    path.display()
                );
            }
            return Ok((Secret::new(secret), Origin::Existing));
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {}
        Err(error) => return Err(error).with_context(|| format!("reading {}", path.display())),
    }
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 32]>())
    );
    // Readable by the owner only; `create_new` so two starts never
    // overwrite each other's secret.
    let mut file = match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
    {
        Ok(file) => file,
        Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
            return load_or_create(data_dir);
        }
        Err(error) => return Err(error).with_context(|| format!("creating {}", path.display())),
    };
    file.write_all(format!("{secret}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .with_context(|| format!("writing {}", path.display()))?;
    Ok((Secret::new(secret), Origin::Created))
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn made_once_private_and_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (made, origin) = load_or_create(dir.path()).expect("made");
        assert_eq!(origin, Origin::Created);
        assert!(standardwebhooks::Webhook::new(made.expose()).is_ok());
        let mode = std::fs::metadata(dir.path().join(FILE))
            .expect("file")
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let (again, origin) = load_or_create(dir.path()).expect("read");
        assert_eq!(origin, Origin::Existing);
        assert_eq!(again.expose(), made.expose());
    }

    #[test]
    fn a_damaged_file_is_named() {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join(FILE), "not a secret").expect("write");
        let error = load_or_create(dir.path()).expect_err("refused");
        assert!(error.to_string().contains("webhook-secret"), "{error}");
    }
}
