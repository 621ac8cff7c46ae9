import json,sys
for f in sys.argv[1:]:
  for l in open(f):
    r=json.loads(l); ms=r['ms']; d=ms['dense dyT x']; fw=ms['dense x W^T']
    print(r['shape'],r['tokens'],r['density'],'threads',r['threads'],'nnz',r['nnz'],'maxerr',round(r['sddmm_err'],7),'bitwise',r['sddmm_bitwise'],r['spmm_bitwise'],r['ops'])
    for k,v in ms.items(): print('   %-48s %9.2f ms  %.3fx dyTx  %.3fx xW'%(k,v,v/d,v/fw))
