"""Parse the responses written by `CIM_DUMP_DIR=dir cargo test -p cim --test responses -- --ignored`
with pywbem's own CIM-XML parser (pywbem 1.9): python check_with_pywbem.py dir"""
import glob, sys
import pywbem
from pywbem import _tupleparse, _tupletree as tupletree

failed = 0
for path in sorted(glob.glob(sys.argv[1] + "/*.xml")):
    data = open(path, "rb").read()
    try:
        tt = tupletree.xml_to_tupletree_sax(data, "CIM-XML response")
        result = _tupleparse.TupleParser().parse_cim(tt)
        print("ok  ", path, repr(result)[:200])
    except Exception as e:  # noqa
        failed += 1
        print("FAIL", path, type(e).__name__, e)
sys.exit(1 if failed else 0)
