//! The binary's function symbols, demangled, from `.symtab` and `.dynsym`.

use std::collections::{BTreeMap, HashSet};

use object::{Object, ObjectSection, ObjectSymbol, SectionKind, SymbolKind};

use crate::generics;

/// One function symbol.
#[derive(Clone, Debug)]
pub struct FunctionSymbol {
    /// Demangled without the hash (`rustc_demangle`'s `{:#}`), generics kept:
    /// `core::ptr::drop_in_place<tokio::runtime::task::core::Stage<…>>`.
    pub name: String,
    /// `name` with every generic argument list removed (legacy's literal
    /// `OwnedTasks<S>` as well as v0's real types): what the catalog matches.
    pub path: String,
    pub address: u64,
    pub size: u64,
}

/// All function symbols, by address.
pub struct SymbolTable {
    by_address: BTreeMap<u64, Vec<FunctionSymbol>>,
    /// How many distinct function symbols there are (for messages).
    pub count: usize,
    /// Did the binary have a `.symtab` at all?
    pub has_symtab: bool,
}

impl SymbolTable {
    /// Reads `.symtab`, then `.dynsym`, keeping function symbols with a
    /// nonzero address and size in an executable section, without duplicates.
    pub fn read(file: &object::File) -> Self {
        let has_symtab = file.section_by_name(".symtab").is_some();
        let mut seen: HashSet<(u64, String)> = HashSet::new();
        let mut by_address: BTreeMap<u64, Vec<FunctionSymbol>> = BTreeMap::new();
        for symbol in file.symbols().chain(file.dynamic_symbols()) {
            if symbol.kind() != SymbolKind::Text || symbol.address() == 0 || symbol.size() == 0 {
                continue;
            }
            let in_code = symbol
                .section_index()
                .and_then(|index| file.section_by_index(index).ok())
                .is_some_and(|section| section.kind() == SectionKind::Text);
            let Ok(raw_name) = symbol.name() else {
                continue;
            };
            if !in_code || !seen.insert((symbol.address(), raw_name.to_string())) {
                continue;
            }
            let name = demangle(raw_name);
            let function = FunctionSymbol {
                path: generics::strip_generic_args(&name),
                name,
                address: symbol.address(),
                size: symbol.size(),
            };
            by_address
                .entry(function.address)
                .or_default()
                .push(function);
        }
        let count = by_address.values().map(Vec::len).sum();
        SymbolTable {
            by_address,
            count,
            has_symtab,
        }
    }

    /// The symbols whose function starts exactly at `address` (several when
    /// identical code folding merged functions).
    pub fn at(&self, address: u64) -> &[FunctionSymbol] {
        self.by_address
            .get(&address)
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// Symbols whose generic-free path is exactly `path`, in address order.
    pub fn with_path<'a>(&'a self, path: &'a str) -> impl Iterator<Item = &'a FunctionSymbol> + 'a {
        self.by_address
            .values()
            .flatten()
            .filter(move |symbol| symbol.path == path)
    }

    /// Every function, once per address: the symbols starting there (several
    /// when identical code folding merged functions), in address order.
    pub fn functions(&self) -> impl Iterator<Item = (u64, &[FunctionSymbol])> + '_ {
        self.by_address
            .iter()
            .map(|(&address, symbols)| (address, symbols.as_slice()))
    }

    pub fn has_path(&self, path: &str) -> bool {
        self.with_path(path).next().is_some()
    }
}

/// Demangles a Rust symbol without its hash; other symbols stay as they are.
/// LLVM may add `.llvm.<digits>` to a local symbol it promoted; that is no
/// part of the Rust name.
pub fn demangle(raw: &str) -> String {
    let raw = raw.split_once(".llvm.").map_or(raw, |(name, _)| name);
    match rustc_demangle::try_demangle(raw) {
        Ok(demangled) => format!("{demangled:#}"),
        Err(_) => raw.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demangles_legacy_without_hash_and_llvm_suffix() {
        assert_eq!(
            demangle("_ZN5tokio7runtime4task3raw4poll17h10cc0c31119ce03cE.llvm.1234567"),
            "tokio::runtime::task::raw::poll"
        );
        assert_eq!(demangle("main"), "main");
    }
}
