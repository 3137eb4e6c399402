//! The simulator's disk: `input/`, `output/` and `temp/` under one root, with ComfyUI's
//! path rules (annotated names, traversal refusal, `prefix_00001_` counters).

use std::path::{Component, Path, PathBuf};

/// One of ComfyUI's three file directories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirKind {
    /// Uploads (`type=input`).
    Input,
    /// Saved outputs (`type=output`).
    Output,
    /// Previews (`type=temp`).
    Temp,
}

impl DirKind {
    /// Parses a `type` value.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "input" => Some(Self::Input),
            "output" => Some(Self::Output),
            "temp" => Some(Self::Temp),
            _ => None,
        }
    }

    /// The `type` value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Input => "input",
            Self::Output => "output",
            Self::Temp => "temp",
        }
    }
}

/// The directories of one simulator.
#[derive(Debug)]
pub(crate) struct Storage {
    root: PathBuf,
    _tmp: Option<tempfile::TempDir>,
}

impl Storage {
    pub(crate) fn new(
        data_dir: Option<&Path>,
        temp_parent: Option<&Path>,
    ) -> std::io::Result<Self> {
        let (root, tmp) = match data_dir {
            Some(d) => (d.to_path_buf(), None),
            None => {
                let mut builder = tempfile::Builder::new();
                builder.prefix("comfy-sim-");
                let t = match temp_parent {
                    Some(parent) => builder.tempdir_in(parent)?,
                    None => builder.tempdir()?,
                };
                (t.path().to_path_buf(), Some(t))
            }
        };
        for k in [DirKind::Input, DirKind::Output, DirKind::Temp] {
            std::fs::create_dir_all(root.join(k.as_str()))?;
        }
        std::fs::create_dir_all(root.join("staging"))?;
        Ok(Self { root, _tmp: tmp })
    }

    pub(crate) fn dir(&self, kind: DirKind) -> PathBuf {
        self.root.join(kind.as_str())
    }

    pub(crate) fn staging(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Files under a directory, as `subfolder/name` paths, sorted.
    pub(crate) fn list(&self, kind: DirKind) -> Vec<String> {
        let base = self.dir(kind);
        let mut out = Vec::new();
        walk(&base, &base, &mut out);
        out.sort();
        out
    }

    /// `folder_paths.annotated_filepath` + `exists_annotated_filepath` for inputs.
    pub(crate) fn input_exists(&self, annotated: &str) -> bool {
        let (name, kind) = annotated_filepath(annotated);
        let kind = kind.unwrap_or(DirKind::Input);
        match safe_join(&self.dir(kind), name) {
            Some(p) => p.is_file(),
            None => false,
        }
    }

    /// Path of an input file named by a node input.
    pub(crate) fn input_path(&self, annotated: &str) -> Option<PathBuf> {
        let (name, kind) = annotated_filepath(annotated);
        safe_join(&self.dir(kind.unwrap_or(DirKind::Input)), name)
    }
}

fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(base, &p, out);
        } else if let Ok(rel) = p.strip_prefix(base) {
            out.push(rel.to_string_lossy().replace('\\', "/"));
        }
    }
}

/// Splits `name [output]` style annotations.
pub(crate) fn annotated_filepath(name: &str) -> (&str, Option<DirKind>) {
    for (suffix, kind) in [
        (" [output]", DirKind::Output),
        (" [input]", DirKind::Input),
        (" [temp]", DirKind::Temp),
    ] {
        if let Some(n) = name.strip_suffix(suffix) {
            return (n, Some(kind));
        }
    }
    (name, None)
}

/// Joins a relative path below `base`, refusing anything that escapes it.
pub(crate) fn safe_join(base: &Path, rel: &str) -> Option<PathBuf> {
    let mut out = base.to_path_buf();
    let mut depth = 0usize;
    for c in Path::new(rel).components() {
        match c {
            Component::Normal(p) => {
                out.push(p);
                depth += 1;
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if depth == 0 {
                    return None;
                }
                out.pop();
                depth -= 1;
            }
            Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// `folder_paths.get_save_image_path`: (full folder, filename base, next counter, subfolder).
pub(crate) fn save_path(
    base: &Path,
    filename_prefix: &str,
) -> Result<(PathBuf, String, u32, String), String> {
    let (subfolder, filename) = match filename_prefix.rsplit_once('/') {
        Some((s, f)) => (s.to_owned(), f.to_owned()),
        None => (String::new(), filename_prefix.to_owned()),
    };
    let Some(folder) = safe_join(base, &subfolder) else {
        return Err(format!(
            "**** ERROR: Saving image outside the output folder is not allowed.\n full_output_folder: {}\n         output_dir: {}",
            base.join(&subfolder).display(),
            base.display()
        ));
    };
    let mut counter = 0u32;
    if let Ok(rd) = std::fs::read_dir(&folder) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(rest) = name.strip_prefix(&format!("{filename}_"))
                && let Some(digits) = rest.split('_').next()
                && digits.len() == 5
                && let Ok(n) = digits.parse::<u32>()
            {
                counter = counter.max(n);
            }
        }
    }
    Ok((folder, filename, counter + 1, subfolder))
}

/// Content type by extension, as Python's `mimetypes` answers for ComfyUI's outputs.
pub(crate) fn content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "bmp" => "image/bmp",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "mov" => "video/quicktime",
        "flac" => "audio/flac",
        "wav" => "audio/x-wav",
        "mp3" => "audio/mpeg",
        "ogg" => "audio/ogg",
        "json" => "application/json",
        "txt" => "text/plain",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traversal_is_refused() {
        let b = Path::new("/x");
        assert!(safe_join(b, "../y").is_none());
        assert!(safe_join(b, "/etc").is_none());
        assert_eq!(safe_join(b, "a/../b"), Some(PathBuf::from("/x/b")));
    }

    #[test]
    fn counters_continue() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::create_dir_all(d.path().join("peer")).expect("mkdir");
        std::fs::write(d.path().join("peer/invert_00002_.png"), b"x").expect("write");
        let (_, f, c, s) = save_path(d.path(), "peer/invert").expect("ok");
        assert_eq!((f.as_str(), c, s.as_str()), ("invert", 3, "peer"));
    }
}
